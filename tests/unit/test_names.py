"""names.py: every child name is deterministic, DNS-safe, short enough, and unique per input."""

from __future__ import annotations

import re

from kubedistill.builders import names

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_stage_job_name_carries_stage_and_key() -> None:
    assert names.stage_job_name("demo", "train", "0123456789abcdef") == "demo-train-01234567"


def test_long_names_are_cut_to_fit_an_indexed_pod_hostname_and_stay_unique() -> None:
    a = names.stage_job_name("a" * 50, "evaluate", "f" * 16)
    b = names.stage_job_name("a" * 49 + "b", "evaluate", "f" * 16)
    assert len(a) <= names.JOB_NAME_MAX and len(b) <= names.JOB_NAME_MAX
    assert a != b
    assert a.endswith("-evaluate-ffffffff")
    # The pod of index 1023 is called <job>-1023: still a DNS label.
    assert len(f"{a}-1023") <= 63 and DNS_LABEL.match(f"{a}-1023")


def test_names_are_deterministic() -> None:
    assert names.stage_job_name("x" * 45, "generate", "1" * 16) == names.stage_job_name("x" * 45, "generate", "1" * 16)


def test_rendezvous_address_is_the_index_0_pod() -> None:
    job = names.stage_job_name("demo", "train", "ab" * 8)
    assert names.rendezvous_address(job) == f"{job}-0.{job}"


def test_labels_and_selectors() -> None:
    labels = names.job_labels("demo", "train", "run1", "key1")
    assert labels[names.LABEL_MANAGED_BY] == "kubedistill"
    assert labels[names.LABEL_JOB] == "demo"
    assert labels[names.LABEL_STAGE] == "train"
    assert labels[names.LABEL_RUN] == "run1"
    assert labels[names.LABEL_STAGE_KEY] == "key1"
    assert names.children_selector("demo") == "app.kubernetes.io/managed-by=kubedistill,kubedistill.io/job=demo"
    assert set(names.stage_selector("demo", "train", "key1").items()) <= set(labels.items())


def test_label_values_fit() -> None:
    assert len(names.label_value("x" * 200)) <= 63
    assert names.label_value("short") == "short"


def test_model_children() -> None:
    assert names.model_deployment_name("faq") == "faq-vllm"
    assert names.model_service_name("faq") == "faq"
    assert names.endpoint("faq", "ml", 8000) == "http://faq.ml.svc:8000/v1"
    assert names.model_fetch_config_name("faq", "0123456789abcdef") == "faq-fetch-01234567"
    selector = names.model_selector("faq")
    assert set(selector.items()) <= set(names.model_labels("faq").items())
