"""Every ``p2pl`` command the README shows is run here, so a README example cannot rot.

The commands are read from the README itself (shell blocks and inline code). ``EXAMPLES`` says
how each one is run: literally where it is cheap, with small overrides (few devices and rounds)
where the real thing takes minutes, and placeholders (CONFIG, DIR, ...) filled in. A command added
to the README without an entry here fails ``test_every_readme_command_is_covered``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from p2pl.cli import main
from p2pl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Few devices, few rounds, one local epoch: every code path of the command, in seconds.
SMALL = ["--set", "devices=10", "--set", "rounds=2", "--set", "training.local_epochs=1"]


def _fenced_blocks(text: str, languages: str) -> list[str]:
    return re.findall(rf"```(?:{languages})\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    """Every ``p2pl ...`` command in the README: lines (and ``&&`` parts) of shell blocks, and
    inline code spans that start with ``p2pl ``; comments stripped, in order, each once."""
    text = README.read_text(encoding="utf-8")
    found: list[str] = []
    for block in _fenced_blocks(text, "bash|sh|shell|console"):
        for line in block.splitlines():
            for part in re.sub(r"(^|\s)#.*$", "", line).split("&&"):
                if part.strip().split(" ")[0] == "p2pl":
                    found.append(" ".join(part.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith("p2pl ")]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Shell:
    """A command line run by bash (for the README's pipes and redirections)."""

    line: str


@dataclass(frozen=True)
class Elsewhere:
    """Run by another test (it needs a running Ray cluster); the test is checked to exist."""

    test_file: str
    test_name: str


Step = list[str] | Shell
Check = Callable[[Path, subprocess.CompletedProcess[str] | None], None]


def _has(*names: str) -> Check:
    def check(cwd: Path, _: subprocess.CompletedProcess[str] | None) -> None:
        for name in names:
            assert (cwd / name).exists(), name

    return check


def _first_line_only(cwd: Path, proc: subprocess.CompletedProcess[str] | None) -> None:
    assert proc is not None and proc.stdout.startswith("topology random-geometric")
    assert proc.stdout.count("\n") == 1 and proc.stderr == ""  # a closed pipe ends quietly


def _table_in_file(cwd: Path, proc: subprocess.CompletedProcess[str] | None) -> None:
    text = (cwd / "results.txt").read_text()
    assert "acc" in text and "results in runs/default/" in text  # results went to stdout


def _node_finished(cwd: Path, _: subprocess.CompletedProcess[str] | None) -> None:
    assert (cwd / "certs/dev-003/dev-003.crt").is_file()
    assert "round" in (cwd / "metrics.csv").read_text()


RAY = "ray"
NODE = "node"
LAUNCH = "launch"

# README command -> (steps run in order in a fresh directory, the last is the example; what to
# check after; what it needs). Setup steps make what the example expects (a CA, a config file).
NODE_STEPS: list[Step] = [
    ["certs", "init", "--dir", "pki"],
    ["certs", "issue", "dev-003", "--ca", "pki", "--host", "10.0.0.13"],
    # The README's node.toml as written, with this machine's loopback instead of its real peer.
    ["node", "--config", "node.toml", "--set", "rounds=1", "--set", "peers=[]", "--set", 'listen="127.0.0.1:0"'],
]
LAUNCH_EXAMPLE: list[Step] = [["launch", "--devices", "4", "--set", "rounds=5", "--out", "runs/launch",
                               "--set", "rounds=2", "--set", "training.local_epochs=1", "--quiet"]]  # fmt: skip
EXAMPLES: dict[str, tuple[list[Step] | Elsewhere, Check | None, str]] = {
    "p2pl run": ([["run", *SMALL]], _has("runs/default/rounds.csv"), ""),
    "p2pl run [CONFIG] --out DIR": ([["run", "exp.toml", "--out", "runs/x", *SMALL]], _has("runs/x/summary.json"), ""),
    "p2pl compare [CONFIG] --out DIR": (
        [["compare", "exp.toml", "--out", "runs/cmp", *SMALL]],
        _has("runs/cmp/accuracy.png"),
        "",
    ),
    "p2pl topology [CONFIG] [--png FILE]": ([["topology", "exp.toml", "--png", "graph.png"]], _has("graph.png"), ""),
    "p2pl topology": ([["topology"]], None, ""),
    "p2pl reproduce [--quick] --out DIR": (
        [["reproduce", "--quick", "--out", "runs/rep", "--rounds", "2", "--only", "C2", "--quiet"]],
        _has("runs/rep/report.md"),
        "",
    ),
    "p2pl certs init": ([["certs", "init"]], _has("pki/ca.crt"), ""),
    "p2pl certs issue DEVICE": ([["certs", "init"], ["certs", "issue", "dev-07"]], _has("certs/dev-07/dev-07.key"), ""),
    "p2pl certs init --dir pki": (NODE_STEPS[:1], _has("pki/ca.key"), ""),
    "p2pl certs issue dev-003 --ca pki --host 10.0.0.13": (NODE_STEPS[:2], _has("certs/dev-003/ca.crt"), ""),
    "p2pl node --config node.toml": (NODE_STEPS, _node_finished, NODE),
    "p2pl node": (NODE_STEPS, _node_finished, NODE),
    "p2pl launch [CONFIG] --devices N --out DIR": (
        [["launch", "exp.toml", "--devices", "3", "--out", "runs/l3", *SMALL, "--quiet"]],
        _has("runs/l3/summary.json"),
        LAUNCH,
    ),
    "p2pl launch --devices 4 --set rounds=5 --out runs/launch": (
        LAUNCH_EXAMPLE,
        _has("runs/launch/rounds.csv"),
        LAUNCH,
    ),
    "p2pl launch": (LAUNCH_EXAMPLE, _has("runs/launch/rounds.csv"), LAUNCH),
    "p2pl run --backend ray [--address ADDR]": (
        [["run", "--backend", "ray", "--shards", "2", *SMALL, "--quiet"]],
        _has("runs/default/summary.json"),
        RAY,
    ),
    "p2pl run --backend ray": (
        [["run", "--backend", "ray", "--shards", "2", *SMALL, "--quiet"]],
        _has("runs/default/summary.json"),
        RAY,
    ),
    "p2pl run CONFIG --backend ray --address HEAD:6379": (
        Elsewhere("test_ray_backend.py", "test_two_node_cluster_runs_an_experiment_end_to_end"),
        None,
        RAY,
    ),
    "p2pl run --set topology.name=ring --set consensus.weights=metropolis --set rounds=100 --out runs/ring": (
        [
            [
                "run",
                "--set",
                "topology.name=ring",
                "--set",
                "consensus.weights=metropolis",
                "--set",
                "rounds=100",
                "--out",
                "runs/ring",
                *SMALL,
            ]
        ],
        _has("runs/ring/metrics.csv"),
        "",
    ),
    "p2pl compare --set partition.scheme=dirichlet --set partition.alpha=0.1 --out runs/noniid": (
        [
            [
                "compare",
                "--set",
                "partition.scheme=dirichlet",
                "--set",
                "partition.alpha=0.1",
                "--out",
                "runs/noniid",
                *SMALL,
            ]
        ],
        _has("runs/noniid/local/summary.json"),
        "",
    ),
    "p2pl compare --algorithms p2pl,dpsgd,gossip,push-sum --out runs/baselines": (
        [["compare", "--algorithms", "p2pl,dpsgd,gossip,push-sum", "--out", "runs/baselines", *SMALL, "--quiet"]],
        _has("runs/baselines/push-sum/summary.json", "runs/baselines/dpsgd/summary.json"),
        "",
    ),
    # the example that used to fail (10 devices left the old fixed-radius graph disconnected): as written
    "p2pl run --engine reference --set devices=10 --set rounds=2": (
        [["run", "--engine", "reference", "--set", "devices=10", "--set", "rounds=2"]],
        _has("runs/default/summary.json"),
        "",
    ),
    "p2pl topology --set devices=16 --png graph16.png": (
        [["topology", "--set", "devices=16", "--png", "graph16.png"]],
        _has("graph16.png"),
        "",
    ),
    "p2pl run DIR/config.toml": (
        [["run", "--out", "runs/a", *SMALL, "--quiet"], ["run", "runs/a/config.toml", "--out", "runs/b", "--quiet"]],
        _has("runs/b/summary.json"),
        "",
    ),
    "p2pl run > results.txt": ([Shell("p2pl run --quiet " + " ".join(SMALL) + " > results.txt")], _table_in_file, ""),
    "p2pl topology | head -1": ([Shell("p2pl topology | head -1")], _first_line_only, ""),
    "p2pl run --set adversary.attack=sign-flip --set adversary.fraction=0.1 --set consensus.aggregation=median "
    "--out runs/attacked": (
        [
            [
                "run",
                "--set",
                "adversary.attack=sign-flip",
                "--set",
                "adversary.fraction=0.1",
                "--set",
                "consensus.aggregation=median",
                "--out",
                "runs/attacked",
                *SMALL,
            ]
        ],
        _has("runs/attacked/devices.csv"),
        "",
    ),
    "p2pl sweep [CONFIG] --grid KEY=V1,V2 --seeds K --out DIR": (
        [["sweep", "exp.toml", "--grid", "topology.name=ring,complete", "--seeds", "2", "--out", "runs/sw", *SMALL]],
        _has("runs/sw/summary.csv"),
        "",
    ),
    "p2pl sweep": (
        [["sweep", "--grid", "consensus.weights=uniform,metropolis", "--seeds", "2", "--out", "runs/sw2", *SMALL]],
        _has("runs/sw2/results.csv"),
        "",
    ),
    "p2pl sweep --grid consensus.aggregation=mean,median --seeds 3 --out runs/sweep": (
        [["sweep", "--grid", "consensus.aggregation=mean,median", "--seeds", "3", "--out", "runs/sweep", *SMALL]],
        _has("runs/sweep/results.csv"),
        "",
    ),
    "p2pl compare --compress top-k,quantize,choco --out runs/compress": (
        [["compare", "--compress", "top-k,quantize,choco", "--out", "runs/compress", *SMALL, "--quiet"]],
        _has("runs/compress/bytes.png", "runs/compress/p2pl-choco/rounds.csv"),
        "",
    ),
    "p2pl compare --seeds 3 --out runs/compare3": (
        [["compare", "--seeds", "3", "--out", "runs/compare3", *SMALL]],
        _has("runs/compare3/accuracy.png"),
        "",
    ),
    "p2pl robustness --quick --out runs/robustness": (
        [
            [
                "robustness",
                "--quick",
                "--out",
                "runs/robustness",
                "--attacks",
                "scale",
                "--rules",
                "mean",
                "--set",
                "rounds=2",
                "--quiet",
            ]
        ],
        _has("runs/robustness/report.md"),
        "",
    ),
    "p2pl robustness [--quick] --out DIR": (
        [
            [
                "robustness",
                "--quick",
                "--out",
                "runs/rob",
                "--attacks",
                "scale",
                "--rules",
                "median",
                "--set",
                "rounds=2",
                "--quiet",
            ]
        ],
        _has("runs/rob/robustness.png"),
        "",
    ),
}


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands()
    assert "p2pl run --engine reference --set devices=10 --set rounds=2" in commands  # the parser sees blocks
    assert "p2pl topology" in commands  # and inline code
    missing = [c for c in commands if c not in EXAMPLES]
    assert not missing, f"README commands without an entry in EXAMPLES: {missing}"
    stale = [c for c in EXAMPLES if c not in commands]
    assert not stale, f"EXAMPLES entries no longer in the README: {stale}"
    for steps, _, _ in EXAMPLES.values():
        if isinstance(steps, Elsewhere):
            assert f"def {steps.test_name}(" in (Path(__file__).parent / steps.test_file).read_text()


def _unique_cases() -> list[object]:
    """One test per distinct step list (several README spellings of one command run once)."""
    cases: dict[str, tuple[list[Step], Check | None, str, list[str]]] = {}
    for command, (steps, check, needs) in EXAMPLES.items():
        if isinstance(steps, Elsewhere):
            continue
        key = repr(steps)
        if key not in cases:
            cases[key] = (steps, check, needs, [])
        cases[key][3].append(command)
    params = []
    for steps, check, needs, commands in cases.values():
        marks = []
        if needs in (NODE, LAUNCH, RAY):
            marks.append(pytest.mark.integration)
        if needs == RAY:
            marks.append(pytest.mark.ray)
        params.append(pytest.param(steps, check, needs, id=commands[0], marks=marks))
    return params


def _write_node_inputs(cwd: Path) -> None:
    """The README's node.toml, verbatim, and the data files it names (digits, the offline default)."""
    toml_blocks = [b for b in _fenced_blocks(README.read_text(encoding="utf-8"), "toml") if 'id = "dev-003"' in b]
    assert len(toml_blocks) == 1, "the README's node.toml example"
    (cwd / "node.toml").write_text(toml_blocks[0])
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    (cwd / "data").mkdir()
    np.savez(cwd / "data/dev-003.npz", x=x[:60], y=y[:60].astype(np.int64))
    np.savez(cwd / "data/test.npz", x=x[-200:], y=y[-200:].astype(np.int64))


def _shell(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``line`` with ``p2pl`` meaning this checkout's p2pl (whatever is installed)."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "p2pl"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m p2pl "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (line, proc.stderr[-2000:])
    return proc


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("steps", "check", "needs"), _unique_cases())
def test_readme_command_runs(
    steps: list[Step], check: Check | None, needs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if needs == RAY:
        pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.toml").write_text("# an empty config is the default experiment\n")
    if needs == NODE:
        _write_node_inputs(tmp_path)
    proc = None
    for step in steps:
        if isinstance(step, Shell):
            proc = _shell(step.line, tmp_path)
        else:
            assert main(step) == 0, step
    if check is not None:
        check(tmp_path, proc)


def test_readme_configuration_block_is_the_default(tmp_path: Path) -> None:
    """The "full default" TOML in the README loads to exactly the built-in default experiment."""
    blocks = [b for b in _fenced_blocks(README.read_text(encoding="utf-8"), "toml") if 'algorithm = "p2pl"' in b]
    assert len(blocks) == 1
    (tmp_path / "default.toml").write_text(blocks[0])
    assert load_config(tmp_path / "default.toml") == load_config()


def test_readme_links_resolve() -> None:
    """Relative links in the README point at files in the repository (no outside references)."""
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/design.md" in links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link
    assert "../" not in text and "DESIGN.md" not in text
