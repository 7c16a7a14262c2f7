"""Fixtures of the e2e tier.

`cluster` and `namespace` are the cluster tier's fixtures (tests/cluster/conftest.py, on top of
tests/support/cluster.py): the same local cluster, reused when it runs, a fresh namespace under the
`restricted` Pod Security Standard per test.
"""

from __future__ import annotations

from tests.cluster.conftest import cluster, namespace

__all__ = ["cluster", "namespace"]
