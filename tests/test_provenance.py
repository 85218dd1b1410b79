"""Provenance: the commit and CPU a report or benchmark records."""

from __future__ import annotations

import re

from locmoe.provenance import REPOSITORY_ROOT, cpu_model, git_commit


def test_git_commit_names_the_checkout_head_or_none_outside_a_checkout(tmp_path):
    state = git_commit(tmp_path)  # not a git checkout
    assert state == {"commit": None, "dirty": False, "changed_files": 0}
    if (REPOSITORY_ROOT / ".git").exists():
        state = git_commit()
        assert re.fullmatch(r"[0-9a-f]{40}", state["commit"])
        assert isinstance(state["dirty"], bool) and state["changed_files"] >= int(state["dirty"])


def test_cpu_model_is_a_name():
    assert isinstance(cpu_model(), str) and cpu_model()
