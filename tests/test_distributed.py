"""The gloo process group is destroyed at interpreter exit, before static destruction."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent("""
    import atexit, sys
    import torch.distributed as dist
    from ofa_lightning.distributed import destroy_process_group_at_exit
    out, init, register = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    # registered first, so it runs last: it sees what the exit handlers left behind
    atexit.register(lambda: open(out, "w").write(str(dist.is_initialized())))
    dist.init_process_group("gloo", init_method="file://" + init, rank=0, world_size=1)
    if register:
        destroy_process_group_at_exit()
        destroy_process_group_at_exit()  # a second registration must not destroy twice
""")


@pytest.mark.parametrize("register, initialized_at_exit", [(True, "False"), (False, "True")])
def test_the_group_is_gone_before_the_interpreter_tears_down(
        tmp_path: Path, register: bool, initialized_at_exit: str) -> None:
    out = tmp_path / "initialized"
    subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "init"), str(int(register))],
                   check=True, timeout=120)
    assert out.read_text() == initialized_at_exit
