"""Every code block of the README runs, as written, so the docs cannot rot: the first command
(install and compile the examples into build/examples-0.1.0, as a new user does), then each
`python` and `bash` block in a fresh process in the checkout, and each `yaml` spec through the
spec loader. Blocks that cannot run here are skipped with the reason: the test command (it is what
runs this test) and blocks marked `<!-- README test: needs a CUDA device -->` on a host without
one. Blocks without a language are not code (the bundle layout, the module map)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from fusebuild import spec
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"(?:<!-- README test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```",
                   re.S)
TEST_COMMAND = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1]


def blocks() -> list[tuple[int, str, str, str]]:
    """(line, language, marker, code) of every fenced block with a language."""
    text = open(README).read()
    return [(text.count("\n", 0, m.start("code")), m["lang"], m["mark"] or "", m["code"])
            for m in FENCE.finditer(text) if m["lang"]]


BLOCKS = blocks()
FIRST = BLOCKS[0]


def _id(block) -> str:
    return f"README.md:{block[0]}-{block[1]}"


def has_cuda_device() -> str:
    """'' when a CUDA device is usable, else why not."""
    try:
        import cupy
        return "" if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as e:  # noqa: BLE001 - no cupy, no driver, no device
        return f"no CUDA device ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


@pytest.fixture(scope="module")
def first_command():
    """The README's first command as written, in the checkout: it (re)installs fusebuild and
    builds build/examples-0.1.0, which the later blocks load (modules from the shared test
    cache, so this costs a no-op install and a cached build)."""
    assert FIRST[1] == "bash" and "fusebuild compile specs/" in FIRST[3]
    run_block(FIRST, ROOT)


def run_block(block, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    line, lang, _, code = block
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail",
                                                                   "-c", code]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FUSEBUILD_NUM_THREADS": "2", **(env or {})})
    assert proc.returncode == 0, (f"README.md:{line} ({lang}) failed:\n{proc.stdout[-2000:]}"
                                  f"\n{proc.stderr[-4000:]}")
    return proc


def test_the_readme_opens_with_the_two_commands():
    """The first block installs and compiles, the second is exactly .ci/run's test command."""
    assert FIRST[3].strip() == 'python3 -m pip install -e ".[build]" && fusebuild compile specs/'
    assert BLOCKS[1][1] == "bash" and BLOCKS[1][3].strip() == TEST_COMMAND


@pytest.mark.parametrize("block", [b for b in BLOCKS[1:] if b[1] in ("python", "bash")], ids=_id)
def test_code_block_runs(block, first_command, tmp_path):
    line, lang, mark, code = block
    if code.strip() == TEST_COMMAND:
        pytest.skip(f"README.md:{line} is the test command, which runs this test")
    if mark == "needs a CUDA device" and (why := has_cuda_device()):
        pytest.skip(f"README.md:{line} needs a CUDA device: {why}")
    assert mark in ("", "needs a CUDA device"), f"README.md:{line}: unknown marker {mark!r}"
    if "ssh-keygen -Y" in code:
        _sign_and_verify(block, tmp_path)
        return
    proc = run_block(block, ROOT)
    if "k.bias_gelu.key(x, bias)" in code:                # the comment says what it prints
        assert proc.stdout.split()[0] == "bias_gelu(f32:cc,f32:bc)"
    if "# training example" in code:                      # the loss goes down
        losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", proc.stdout)]
        assert len(losses) >= 2 and losses[-1] < losses[0], proc.stdout


def _sign_and_verify(block, tmp_path) -> None:
    """The signing recipe in a workspace holding the user's key and allowed_signers file, which
    the text around the block names; a tampered archive then fails its verification."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci@example.com", "-f",
                    str(key)], check=True)
    pub = (home / ".ssh" / "id_ed25519.pub").read_text().split()
    (tmp_path / "allowed_signers").write_text(f"ci@example.com {pub[0]} {pub[1]}\n")
    os.symlink(os.path.join(ROOT, "build"), tmp_path / "build")
    run_block(block, str(tmp_path), env={"HOME": str(home)})
    archive = tmp_path / "examples.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 1
    archive.write_bytes(bytes(data))
    verify = block[3].strip().splitlines()[-1]
    assert subprocess.run(["bash", "-c", verify], cwd=tmp_path, capture_output=True,
                          env={**os.environ, "HOME": str(home)}).returncode != 0


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[1] == "yaml"], ids=_id)
def test_yaml_block_is_a_valid_spec(block, tmp_path):
    """A whole spec loads as it is; a group entry (an indented fragment) as the only group of a
    spec. Both go through the spec loader (parse, type-check, expand the matrix)."""
    line, _, _, code = block
    text = code if code.startswith("fusebuild:") else \
        "fusebuild: 1\ngroups:\n" + textwrap.indent(textwrap.dedent(code), "  ")
    path = tmp_path / f"readme_{line}.yaml"
    path.write_text(text)
    plan = spec.load_plan([str(path)], targets=["cpu:x86-64-v2"])
    assert plan.groups


def test_the_group_count_of_the_readme_is_the_examples():
    """'Example specs in `specs/` (N groups)' counts the groups the examples declare."""
    n = int(re.search(r"Example specs in `specs/` \((\d+) groups\)", open(README).read())[1])
    plan = spec.load_plan([os.path.join(ROOT, "specs")])
    assert n == sum(1 for gp in plan.groups if not gp.group.name.endswith("__grad"))
