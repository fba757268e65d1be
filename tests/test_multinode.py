"""Two 'hosts' for real: two Linux network namespaces joined by a veth pair, each with its own
address and hostname; `launch.sh --hostfile` starts one rank on each over TCP (PRRTE's launch
agent enters the namespace instead of ssh). Skipped where the machine refuses namespaces."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from tests.conftest import ROOT
from tests.mpi_run import run_mpi

pytestmark = [pytest.mark.mpi]

AGENT = """#!/bin/sh
# PRRTE launch agent standing in for ssh: $1 is the host, the rest the command to run there.
host="$1"; shift
case "$host" in
{cases}
  *) echo "agent: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; $*"
"""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def two_hosts(tmp_path):
    """Namespaces A and B joined by a veth pair: (run-in-A prefix, hostfile, agent script)."""
    for tool in ("ip", "unshare", "mpirun"):
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed (ip: apt-get install iproute2; unshare: "
                        "util-linux; mpirun: pip install '.[mpi]')")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    ns = {"A": f"otA{tag}", "B": f"otB{tag}"}
    ips = {"A": f"10.213.{os.getpid() % 250}.1", "B": f"10.213.{os.getpid() % 250}.2"}
    veth = (f"otva{tag}", f"otvb{tag}")
    created = []
    try:
        for side in "AB":
            if _run("ip", "netns", "add", ns[side], check=False).returncode != 0:
                pytest.skip("this machine refuses network namespaces (ip netns add failed)")
            created.append(ns[side])
        setup = [("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]),
                 ("ip", "link", "set", veth[0], "netns", ns["A"]),
                 ("ip", "link", "set", veth[1], "netns", ns["B"])]
        for side, dev in zip("AB", veth, strict=True):
            setup += [("ip", "-n", ns[side], "addr", "add", f"{ips[side]}/24", "dev", dev),
                      ("ip", "-n", ns[side], "link", "set", dev, "up"),
                      ("ip", "-n", ns[side], "link", "set", "lo", "up")]
        for cmd in setup:
            proc = _run(*cmd, check=False)
            if proc.returncode != 0:
                pytest.skip(f"veth pair between namespaces refused: {' '.join(cmd)}: "
                            f"{proc.stderr.strip()}")
        cases = "\n".join(f'  {ips[s]}|node{s}) ns={ns[s]}; name=node{s} ;;' for s in "AB")
        agent = tmp_path / "agent.sh"
        agent.write_text(AGENT.format(cases=cases))
        agent.chmod(0o755)
        hostfile = tmp_path / "hosts"
        hostfile.write_text(f"{ips['A']} slots=1\n{ips['B']} slots=1\n")
        in_a = ["ip", "netns", "exec", ns["A"], "unshare", "--uts", "sh", "-c",
                'hostname nodeA; exec "$@"', "sh"]
        yield in_a, hostfile, agent
    finally:
        for name in created:
            _run("ip", "netns", "del", name, check=False)


def _launch(in_a, hostfile, agent, *args: str, timeout: float = 180):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = in_a + [str(ROOT / "launch.sh"), "-np", "2", "--hostfile", str(hostfile),
                  "--prtemca", "plm_ssh_agent", str(agent), "--mca", "btl", "tcp,self",
                  "--mca", "pml", "ob1", *args]
    return run_mpi(cmd, timeout=timeout, env=env, cwd=ROOT)


def test_allreduce_across_two_hosts(two_hosts):
    proc = _launch(*two_hosts, "--selftest", "--mb", "4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "selftest ok: 2 rank(s) on 2 host(s) (nodeA: rank 0; nodeB: rank 1)" in proc.stdout


def test_training_across_two_hosts_equals_one_process(two_hosts, tmp_path, digits_config):
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    raw = digits_config(precision="fp64", steps=2, output=str(tmp_path / "two.onnx"),
                        optimizer={"type": "adamw", "lr": 3e-3}, log={"every_steps": 1})
    raw["data"].pop("eval")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(*two_hosts, str(path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx")}, tmp_path),
            stream=io.StringIO()).fit()
    ours, ref = (_weights(tmp_path / "two.onnx"), _weights(tmp_path / "one.onnx"))
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-9, atol=1e-12, err_msg=name)


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
