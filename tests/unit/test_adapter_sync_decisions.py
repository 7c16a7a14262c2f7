"""The adapter-sync sidecar's decisions: what vLLM holds, what to load and unload, when the replica is Ready.

The processes themselves (vLLM CPU servers, the sidecar, an API server) are exercised in
tests/worker/test_adapter_sync.py, tests/worker/test_adapter_convergence.py and
tests/cluster/test_adapter_sync_report.py.
"""

from __future__ import annotations

from pathlib import Path

from kubedistill.api.worker_config import AdapterEntry
from kubedistill.worker.adapter_sync import held_adapters, is_ready, plan_sync, promise

DIR = Path("/adapters")


def entry(name: str, revision: str) -> AdapterEntry:
    return AdapterEntry(name=name, uri=f"s3://b/{name}-{revision}", revision=revision)


def test_held_adapters_are_the_lora_cards_loaded_from_the_sidecars_directory() -> None:
    cards = [
        {"id": "base", "root": "/models/model", "parent": None},
        {"id": "sql", "root": "/adapters/sql/r2", "parent": "base"},
        {"id": "faq", "root": "/adapters/faq/r1", "parent": "base"},
        {"id": "static", "root": "/models/static-lora", "parent": "base"},  # --lora-modules: not ours
        {"id": "odd", "root": "/adapters/other/r1", "parent": "base"},  # name and directory disagree
    ]
    assert held_adapters(cards, DIR) == {"sql": "r2", "faq": "r1"}


def test_plan_loads_what_is_missing_or_stale_and_unloads_what_left() -> None:
    wanted = {"a": entry("a", "r2"), "b": entry("b", "r1"), "c": entry("c", "r1")}
    unload, load = plan_sync(wanted, {"a": "r1", "b": "r1", "gone": "r1"})
    assert unload == ["gone"]
    assert [(e.name, e.revision) for e in load] == [("a", "r2"), ("c", "r1")]
    assert plan_sync(wanted, {"a": "r2", "b": "r1", "c": "r1"}) == ([], [])


def test_a_new_replica_promises_nothing_until_it_held_the_whole_set() -> None:
    wanted = {"a": "r1", "b": "r1"}
    assert promise(None, wanted, {"a": "r1"}) is None
    assert not is_ready(None, {"a": "r1"})
    assert promise(None, wanted, {"a": "r1", "b": "r1"}) == wanted
    assert is_ready(wanted, {"a": "r1", "b": "r1"})
    assert promise(None, {}, {}) == {} and is_ready({}, {})  # an empty pool serves its base at once
    assert not is_ready({}, None)  # vLLM not up


def test_a_ready_replica_stays_ready_while_a_new_adapter_loads_or_fails() -> None:
    promised = {"a": "r1", "b": "r1"}
    wanted = {"a": "r1", "b": "r1", "new": "r1"}
    after = promise(promised, wanted, {"a": "r1", "b": "r1"})  # "new" could not be fetched
    assert after == promised and is_ready(after, {"a": "r1", "b": "r1"})
    assert promise(after, wanted, {"a": "r1", "b": "r1", "new": "r1"}) == wanted


def test_promotion_and_removal_change_what_is_promised() -> None:
    promised = {"a": "r1", "b": "r1"}
    promoted = promise(promised, {"a": "r2", "b": "r1"}, {"a": "r2", "b": "r1"})
    assert promoted == {"a": "r2", "b": "r1"}
    failed = promise(promised, {"a": "r2", "b": "r1"}, {"a": "r1", "b": "r1"})  # r2 not loadable: a serves r1
    assert failed == {"b": "r1"} and is_ready(failed, {"a": "r1", "b": "r1"})
    assert promise(promised, {"b": "r1"}, {"b": "r1"}) == {"b": "r1"}


def test_a_vllm_that_lost_its_adapters_is_unready_until_they_are_back() -> None:
    promised = {"a": "r1", "b": "r1"}
    assert not is_ready(promised, {})  # vLLM restarted in the pod: it holds nothing
    assert promise(promised, promised, {}) == promised  # still promised, so the replica stays unready
    assert not is_ready(promise(promised, promised, {"a": "r1"}), {"a": "r1"})
    assert is_ready(promise(promised, promised, {"a": "r1", "b": "r1"}), {"a": "r1", "b": "r1"})
