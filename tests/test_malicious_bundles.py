"""Malicious bundles, archives, shards and cache entries (issue 10, items 1-6; issue 19, item 1).

One tiny bundle is built per module; each attack edits a copy (recomputing the manifest id, as an
attacker can) and must be refused with a BundleError saying why, by the runtime and by the CLI
(exit 1, no traceback), without running the attacker's code or writing outside the bundle."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import types

import numpy as np
import pytest
from click.testing import CliRunner

from fusebuild import build, runtime, spec
from fusebuild.artifact import read_description
from fusebuild.bundle import merge_shards, pack
from fusebuild.cache import Cache, Entry
from fusebuild.cli import main as cli_main
from fusebuild.errors import BundleError
from fusebuild.runtime.manifest import bundle_id, canonical_json, read_manifest
from fusebuild.verify import verify

SPEC = """fusebuild: 1
bundle: {name: tiny, version: "1"}
targets: [cpu:x86-64-v2]
groups:
  - name: axpy
    inputs: {x: tensor, y: tensor, a: scalar(float32)}
    outputs: [z]
    body: 'z = x * a + y'
    matrix: {dtype: [float32], shapes: [{x: [N], y: [N]}]}
"""
SO = "cpu/x86-64-v2/axpy.so"
SYMBOL = "fb_axpy__f32_c__f32_c"
EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran", f); fclose(f); }
}
void SYMBOL(void) {}
"""


def _build_uncached(tmp_path_factory, name: str, text: str) -> str:
    """Spec `text` built into a fresh folder, without the compile cache."""
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.yaml").write_text(text)
    plan = spec.load_plan([str(d / f"{name}.yaml")])
    return build.build(plan, str(d / "out"), cache_dir=None, progress=False).path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    return _build_uncached(tmp_path_factory, "malicious", SPEC)


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[str, str]:
    """A shared object whose constructor writes a marker file, exporting the kernel's symbol;
    (its path, the marker's path)."""
    d = tmp_path_factory.mktemp("evil")
    marker = str(d / "MARKER")
    (d / "evil.c").write_text(EVIL_C)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', f"-DSYMBOL={SYMBOL}",
                    "-o", str(d / "evil.so"), str(d / "evil.c")], check=True)
    return str(d / "evil.so"), marker


def _private_copy(bundle: str, tmp_path, monkeypatch) -> str:
    """A private copy of `bundle`, and a private archive cache."""
    monkeypatch.setenv("FUSEBUILD_CACHE_DIR", str(tmp_path / "cache"))
    dst = tmp_path / "b" / os.path.basename(bundle)
    shutil.copytree(bundle, dst)
    return str(dst)


@pytest.fixture
def root(built, tmp_path, monkeypatch) -> str:
    return _private_copy(built, tmp_path, monkeypatch)


def rewrite(root: str, edit) -> None:
    """Apply `edit` to the manifest and recompute its id."""
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    edit(m)
    m["id"] = bundle_id(m)
    with open(path, "w") as f:
        json.dump(m, f)


def sha(path: str) -> dict:
    data = open(path, "rb").read()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def cli(*args: str):
    return CliRunner().invoke(cli_main, list(args))


def assert_cli_refuses(commands: list[list[str]], message: str) -> None:
    for args in commands:
        r = cli(*args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
        assert message in r.output and "Traceback" not in r.output, (args, r.output)


def ones() -> np.ndarray:
    return np.ones(8, np.float32)


# ---------------------------------------------------------------- items 1 and 3: the manifest --

def _point_kernel(m: dict, file: str, digest: str) -> None:
    m["kernels"][0].update(file=file, sha256=digest)


def _listed_outward(root, evil_so):        # kernel and artifact '../evil.so'
    shutil.copy(evil_so, os.path.join(root, "..", "evil.so"))
    info = sha(evil_so)
    rewrite(root, lambda m: (m["artifacts"].update({"../evil.so": info}),
                             _point_kernel(m, "../evil.so", info["sha256"])))


def _unlisted_outward(root, evil_so):      # kernel file '../evil.so', not an artifact
    shutil.copy(evil_so, os.path.join(root, "..", "evil.so"))
    rewrite(root, lambda m: _point_kernel(m, "../evil.so", sha(evil_so)["sha256"]))


def _unlisted_inside(root, evil_so):       # an unlisted .so beside the genuine one
    shutil.copy(evil_so, os.path.join(root, "cpu", "x86-64-v2", "evil.so"))
    rewrite(root, lambda m: _point_kernel(m, "cpu/x86-64-v2/evil.so", sha(evil_so)["sha256"]))


def _absolute(root, evil_so):
    info = sha(evil_so)
    rewrite(root, lambda m: (m["artifacts"].update({evil_so: info}),
                             _point_kernel(m, evil_so, info["sha256"])))


def _dotted(root, evil_so):                # 'cpu/./x86-64-v2/..' spellings
    info = sha(evil_so)
    shutil.copy(evil_so, os.path.join(root, "cpu", "evil.so"))
    rewrite(root, lambda m: (m["artifacts"].update({"cpu/x86-64-v2/../evil.so": info}),
                             _point_kernel(m, "cpu/x86-64-v2/../evil.so", info["sha256"])))


def _kernel_sha(root, evil_so):            # the kernel's own sha256 is not its artifact's
    rewrite(root, lambda m: m["kernels"][0].update(sha256=sha(evil_so)["sha256"]))


def _other_level(root, evil_so):           # a v2 kernel in the v4 folder (SIGILL on a v2 host)
    def edit(m):
        m["artifacts"]["cpu/x86-64-v4/axpy.so"] = m["artifacts"].pop(SO)
        m["kernels"][0]["file"] = "cpu/x86-64-v4/axpy.so"
    os.rename(os.path.join(root, "cpu", "x86-64-v2"), os.path.join(root, "cpu", "x86-64-v4"))
    rewrite(root, edit)


def _symbol(root, evil_so):
    rewrite(root, lambda m: m["kernels"][0].update(symbol="fb_axpy__f32_cc__f32_cc"))


def _name(root, evil_so):                  # a bundle name that is a path
    rewrite(root, lambda m: m.update(name="../../x"))


def _link_outward(name: str):
    def attack(root, evil_so):
        outside = os.path.join(root, "..", "moved-" + name.replace("/", "-"))
        os.rename(os.path.join(root, name), outside)
        os.symlink(os.path.abspath(outside), os.path.join(root, name))
    return attack


MANIFEST_ATTACKS = {
    "listed ../evil.so": (_listed_outward, "not a plain relative path"),
    "unlisted ../evil.so": (_unlisted_outward, "is not a listed artifact"),
    "unlisted .so inside": (_unlisted_inside, "is not a listed artifact"),
    "absolute path": (_absolute, "not a plain relative path"),
    "dotted path": (_dotted, "not a plain relative path"),
    "kernel sha256": (_kernel_sha, "differs from that of its file"),
    "other ISA folder": (_other_level, "not in the folder of its target"),
    "symbol": (_symbol, "is not its key's"),
    "bundle name": (_name, "without '/'"),
    "manifest.json a link": (_link_outward("manifest.json"), "symbolic link"),
    "cpu/ a link": (_link_outward("cpu"), "symbolic link"),
    "artifact a link": (_link_outward(SO), "symbolic link"),
}
READS_ARTIFACTS = {"cpu/ a link", "artifact a link"}     # `inspect` reads only the manifest


@pytest.mark.parametrize("attack", MANIFEST_ATTACKS, ids=str)
def test_manifest_attacks_are_refused_before_any_code_runs(root, evil, tmp_path, attack):
    edit, message = MANIFEST_ATTACKS[attack]
    evil_so, marker = evil
    edit(root, evil_so)
    with pytest.raises(BundleError, match=message):
        runtime.load(root)
    commands = [["verify", root, "--numerics"], ["list", root],
                ["pack", root, "-o", str(tmp_path / "p.tar.gz")]]
    assert_cli_refuses(commands + ([] if attack in READS_ARTIFACTS else [["inspect", root]]),
                       message)
    assert not os.path.exists(marker), "the attacker's constructor ran"
    assert not (tmp_path / "p.tar.gz").exists()


def _edit_outputs(m):                      # the kernel entry says float16: a buffer half as big
    m["kernels"][0]["outputs"] = ["float16"]


def _edit_group(m):                        # the group forces float16 (its hash recomputed)
    from fusebuild import syntax
    m["groups"]["axpy"]["outputs"][0]["dtype"] = "float16"
    group = syntax.group_from_json(m["groups"]["axpy"])
    m["groups"]["axpy"]["spec_hash"] = group.spec_hash


def _edit_chunk(m):                        # inputs disagree with the body (the ABI with the .so)
    m["groups"]["axpy"]["inputs"][0]["chunk"] = [2, 0]


@pytest.mark.parametrize("edit,y,message,verify_message", [
    (_edit_outputs, 8, "records outputs float16 where its group computes float32", None),
    (_edit_group, 8, "was built for group IR", "records outputs float32 where its group "
     "computes float16"),
    (_edit_chunk, 4, "does not match its own body", None),
], ids=["kernel outputs", "group output dtype", "group chunk"])
def test_output_sizes_come_from_the_artifact(root, edit, y, message, verify_message):
    """Before the fix, the first two allocated a float16 output for a kernel writing float32
    (heap corruption). The runtime checks the manifest against the artifact's description
    (which pins the group's hash), `verify` against the group's IR as well."""
    rewrite(root, edit)
    k = runtime.load(root)
    with pytest.raises(BundleError, match=message):
        k.axpy(ones(), np.ones(y, np.float32), 2.0)
    assert_cli_refuses([["verify", root]], verify_message or message)


def test_the_genuine_bundle_passes_every_check(root, tmp_path):
    np.testing.assert_array_equal(runtime.load(root).axpy(ones(), ones(), 2.0), ones() * 3)
    for args in (["verify", root, "--numerics"], ["list", root], ["inspect", root],
                 ["pack", root, "-o", str(tmp_path / "p.tar.gz")]):
        r = cli(*args)
        assert r.exit_code == 0, (args, r.output)


# ---------------------------------------------------------------- issue 19: manifest text ------

DEEP = 5000


def _deep_field(m: dict) -> bytes:
    """A field 5,000 arrays deep, the id computed as an attacker can (json.dumps of the nested
    lists would itself exceed the recursion limit: the text is spliced)."""
    body = {k: v for k, v in m.items() if k != "id"}
    nested = "[" * DEEP + "]" * DEEP
    canonical = canonical_json({**body, "deep": 0}).replace('"deep":0', f'"deep":{nested}')
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps({**body, "deep": 0, "id": digest}).replace('"deep": 0',
                                                                 f'"deep": {nested}').encode()


def _format(value):
    def edit(m: dict) -> bytes:
        m["format"] = value
        m["id"] = bundle_id(m)
        return json.dumps(m).encode()
    return edit


MANIFEST_TEXTS = {
    "5,000-deep field": (_deep_field, "JSON nested deeper than 64 levels"),
    "format true": (_format(True), "bundle format True; this fusebuild reads format 1"),
    "format 1.0": (_format(1.0), "bundle format 1.0; this fusebuild reads format 1"),
    "UTF-16": (lambda m: json.dumps(m).encode("utf-16"), "not JSON of a manifest: not UTF-8"),
    "UTF-8 with a BOM": (lambda m: b"\xef\xbb\xbf" + json.dumps(m).encode(),
                         "not JSON of a manifest: Unexpected UTF-8 BOM"),
}


@pytest.mark.parametrize("case", MANIFEST_TEXTS, ids=str)
def test_manifests_are_utf8_json_of_format_1_and_bounded_depth(root, tmp_path, case):
    """Before the fix the deep field raised RecursionError (a traceback from every command) and
    the others loaded."""
    edit, message = MANIFEST_TEXTS[case]
    members = _members(pack(root, str(tmp_path / "a.tar.gz")))
    with open(os.path.join(root, "manifest.json")) as f:
        text = edit(json.load(f))
    with open(os.path.join(root, "manifest.json"), "wb") as f:
        f.write(text)
    archive = _write_archive(str(tmp_path / "edited.tar.gz"),
                             [(n, text if n.endswith("manifest.json") else d) for n, d in members])
    for path in (root, archive):
        with pytest.raises(BundleError, match=message):
            runtime.load(path)
        assert_cli_refuses([["verify", path], ["list", path], ["inspect", path]], message)


# ---------------------------------------------------------------- item 2: check then use -------

def test_a_file_swapped_after_load_is_refused_not_run(root, evil):
    """The .so is replaced between load() and the first call (a fresh process: no library of
    these bytes loaded yet)."""
    evil_so, marker = evil
    so = os.path.join(root, SO)
    code = f"""
import os, shutil, numpy as np
from fusebuild import runtime
from fusebuild.errors import BundleError
k = runtime.load({root!r})
shutil.copy({evil_so!r}, {so!r} + ".new")
os.replace({so!r} + ".new", {so!r})
try:
    k.axpy(np.ones(4, np.float32), np.ones(4, np.float32), 2.0)
    print("RAN")
except BundleError as e:
    print("REFUSED", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("REFUSED") and "corrupt or tampered" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(marker)


def test_the_loaded_library_is_the_verified_bytes(root):
    """After the first call, the kernel runs from a sealed in-memory copy: the file on disk
    is no longer used (it may change or go)."""
    k = runtime.load(root)
    np.testing.assert_array_equal(k.axpy(ones(), ones(), 2.0), ones() * 3)
    maps = open("/proc/self/maps").read()
    assert os.path.join(root, SO) not in maps and "fusebuild:axpy.so" in maps


def test_libraries_loaded_one_after_another_are_each_their_own(tmp_path):
    """Each library is dlopened as /proc/self/fd/N; were N reused after a close, the loader
    would hand out the earlier library again under that name."""
    from fusebuild.runtime.cpu import load_verified
    for name in ("first", "second", "third"):
        (tmp_path / f"{name}.c").write_text(f"int {name}(void) {{ return 1; }}\n"
                                             f'const char fusebuild_artifact[{len(name)}] = '
                                             f'"{name}";\n')
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / f"{name}.so"),
                        str(tmp_path / f"{name}.c")], check=True)
        so = str(tmp_path / f"{name}.so")
        lib = load_verified(str(tmp_path), f"{name}.so", sha(so)["sha256"], name.encode())
        assert lib[name]() == 1


# ---------------------------------------------------------------- item 4: merge ----------------

def _as_shard(m):
    m["shard"] = {"index": 0, "count": 1, "plan": "p"}


def test_merge_writes_only_inside_its_output(root, tmp_path):
    rewrite(root, _as_shard)
    path, _ = merge_shards([root], str(tmp_path / "good"))       # the crafted shard is valid
    assert runtime.load(path).axpy(ones(), ones(), 1.0)[0] == 2
    payload = os.path.normpath(os.path.join(root, "..", "..", "payload.so"))
    open(payload, "wb").write(b"payload")
    rewrite(root, lambda m: m["artifacts"].update({"../../payload.so": sha(payload)}))
    out = tmp_path / "o" / "merged"
    with pytest.raises(BundleError, match="not a plain relative path"):
        merge_shards([root], str(out))
    assert_cli_refuses([["merge", root, "-o", str(out)]], "not a plain relative path")
    assert not (tmp_path / "o" / "payload.so").exists() and not out.exists()


# ---------------------------------------------------------------- item 5: archives -------------

def _members(archive: str) -> list[tuple[str, bytes]]:
    with tarfile.open(archive, "r:gz") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_archive(path: str, members: list[tuple[str, bytes]]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(gzip.compress(buf.getvalue()))
    return path


def _cache_files(tmp_path) -> list[str]:
    base = tmp_path / "cache"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")) if base.exists() else []


def test_archive_members_not_in_the_manifest_are_not_extracted(root, tmp_path):
    members = _members(pack(root, str(tmp_path / "a.tar.gz")))
    bomb = _write_archive(str(tmp_path / "bomb.tar.gz"),
                          members + [("tiny-1/extra.bin", b"\0" * (1 << 20))])
    with pytest.raises(BundleError, match="'tiny-1/extra.bin' is not in its manifest"):
        runtime.load(bomb)
    assert not any("extra.bin" in p for p in _cache_files(tmp_path))
    assert_cli_refuses([["verify", bomb]], "not in its manifest")
    assert _cache_files(tmp_path) in ([], ["bundles"])       # no stage, no partial bundle


@pytest.mark.parametrize("cut", [0.5, -12, -4, -1], ids=["half", "in padding", "in CRC", "last"])
def test_truncated_archives_are_refused(root, tmp_path, cut):
    archive = pack(root, str(tmp_path / "a.tar.gz"))
    data = open(archive, "rb").read()
    open(archive, "wb").write(data[:int(len(data) * cut) if cut > 0 else cut])
    with pytest.raises(BundleError, match="truncated"):
        runtime.load(archive)
    assert_cli_refuses([["verify", archive]], "truncated")
    assert _cache_files(tmp_path) in ([], ["bundles"])


def test_a_tampered_archive_with_a_valid_id_does_not_poison_the_cache(root, tmp_path):
    genuine = pack(root, str(tmp_path / "a.tar.gz"))
    members = [(n, bytes(d[:100]) + bytes([d[100] ^ 1]) + d[101:] if n.endswith(".so") else d)
               for n, d in _members(genuine)]
    tampered = _write_archive(str(tmp_path / "t.tar.gz"), members)
    with pytest.raises(BundleError, match="axpy.so is corrupt or tampered"):
        runtime.load(tampered)
    assert _cache_files(tmp_path) in ([], ["bundles"])
    k = runtime.load(genuine)
    np.testing.assert_array_equal(k.axpy(ones(), ones(), 2.0), ones() * 3)
    cached = os.path.join(k.root, SO)                           # spoil the cached copy
    os.chmod(cached, 0o644)
    open(cached, "r+b").write(b"\0" * 64)
    again = runtime.load(genuine)                               # replaced, not trusted
    assert sha(cached)["sha256"] == sha(os.path.join(root, SO))["sha256"]
    assert again.root == k.root
    with pytest.raises(BundleError, match="corrupt or tampered"):
        runtime.load(tampered)                                  # even with a good cache


# ---------------------------------------------------------------- item 6: regular files only ---

def _special(kind: str, path: str) -> None:
    """A FIFO, or a link to /dev/zero, at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


def test_fifos_and_devices_are_refused_without_hanging(root, tmp_path):
    """Each case runs in one child process with a time and memory limit: before the fix they
    blocked forever (FIFO) or read until the OOM killer (/dev/zero)."""
    cases = {}
    for what, rel in (("artifact", SO), ("manifest", "manifest.json")):
        for kind in ("fifo", "zero"):
            d = tmp_path / f"{what}-{kind}" / "tiny-1"
            shutil.copytree(root, d)
            os.remove(d / rel)
            _special(kind, str(d / rel))
            cases[f"{what} {kind}"] = str(d)
    cache = Cache(str(tmp_path / "c"))
    for kind, key in (("fifo", "a" * 64), ("zero", "b" * 64)):
        os.makedirs(os.path.dirname(cache._path(key)), exist_ok=True)
        _special(kind, cache._path(key))
    code = f"""
import json, resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from click.testing import CliRunner
from fusebuild import runtime
from fusebuild.cache import Cache
from fusebuild.cli import main
from fusebuild.errors import BundleError
out = {{}}
for name, path in {cases!r}.items():
    try:
        runtime.load(path)
        out[name] = "loaded"
    except BundleError as e:
        out[name] = str(e)
    r = CliRunner().invoke(main, ["verify", path])
    out[name + " cli"] = [r.exit_code, r.output]
cache = Cache({str(tmp_path / "c")!r})
out["cache"] = [cache.get("a" * 64), cache.get("b" * 64)]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for name in cases:
        why = "not a regular file" if name.endswith("fifo") else "symbolic link"
        assert why in out[name], (name, out[name])
        code_, text = out[name + " cli"]
        assert code_ == 1 and why in text and "Traceback" not in text, (name, text)
    assert out["cache"] == [None, None]


# ---------------------------------------------------------------- item 3: the compile cache ----

def test_cache_checksum_covers_the_metadata(tmp_path):
    cache = Cache(str(tmp_path))
    kernels = [{"key": "g(f32:c)", "outputs": ["float32"]}]
    cache.put("k" * 64, Entry({SO: b"bytes"}, kernels))
    assert cache.get("k" * 64).kernels == kernels
    path = cache._path("k" * 64)
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b'"float32"', b'"float16"'))
    assert cache.get("k" * 64) is None


def test_a_cache_hit_and_a_manifest_read_allocate_what_they_read(root, tmp_path):
    """With 128 MiB of address space to spare: reads once allocated their limit up front (4 GiB
    per cache hit, 256 MiB per manifest) and died with MemoryError."""
    cache = Cache(str(tmp_path / "c"))
    cache.put("k" * 64, Entry({SO: b"bytes"}, []))
    code = f"""
import resource
from fusebuild.cache import Cache
from fusebuild.runtime.manifest import read_manifest
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))
assert Cache({str(tmp_path / "c")!r}).get("k" * 64).artifacts == {{{SO!r}: b"bytes"}}
print(read_manifest({root!r})["id"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == read_manifest(root)["id"]


def test_a_cache_entry_for_other_paths_is_a_miss(tmp_path):
    """An entry (checksum intact) whose artifact path points outside the bundle is recompiled,
    never written."""
    (tmp_path / "tiny.yaml").write_text(SPEC)
    plan = spec.load_plan([str(tmp_path / "tiny.yaml")])
    first = build.build(plan, str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), progress=False)
    cache = Cache(str(tmp_path / "c"))
    (path,) = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    entry = cache.get(path.name)
    bad = "../../payload.so"
    cache.put(path.name, Entry({bad: entry.artifacts[SO]},
                               [{**k, "file": bad} for k in entry.kernels]))
    again = build.build(plan, str(tmp_path / "o2"), cache_dir=str(tmp_path / "c"),
                        progress=False)
    assert (again.compiled, again.cached) == (1, 0)
    assert again.manifest["id"] == first.manifest["id"]
    assert not (tmp_path / "payload.so").exists()


# ---------------------------------------------------------------- issue 19, item 1: artifacts --
# Each artifact carries the description of what it computes (fusebuild/artifact.py); a manifest
# edited consistently (group IR, spec_hash, bundle id recomputed) no longer binds it to another
# group, ABI or ISA level.

DESCRIBED = """fusebuild: 1
bundle: {name: described, version: "1"}
targets: [cpu:x86-64-v2, cpu:x86-64-v4]
groups:
  - name: halves
    inputs: {x: tensor}
    outputs: [y]
    body: |
      a, b = chunk(x, 2, dim=-1)
      y = cat([b, a], dim=-1)
    matrix: {dtype: [float32], shapes: [{x: [B, 2*N]}]}
  - name: soft
    inputs: {x: tensor}
    outputs: [y]
    body: 'y = softmax(x)'
    matrix: {dtype: [float32], shapes: [{x: [B, N]}]}
  - name: sq
    inputs: {x: tensor}
    outputs: [y]
    body: 'y = x * x'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
    targets: [cpu:x86-64-v2, cpu:x86-64-v4, cuda:sm_80, cuda:sm_90, cuda:compute_90]
"""


@pytest.fixture(scope="module")
def described_build(tmp_path_factory) -> str:
    return _build_uncached(tmp_path_factory, "described", DESCRIBED)


@pytest.fixture
def described(described_build, tmp_path, monkeypatch) -> str:
    return _private_copy(described_build, tmp_path, monkeypatch)


def _regroup(name: str, body: str):
    """An edit giving group `name` another body, its JSON and spec_hash recomputed from it."""
    def edit(m):
        from fusebuild import syntax
        group = syntax.group_from_json({**m["groups"][name], "body": body})
        m["groups"][name] = {**group.to_json(), "spec_hash": group.spec_hash}
    return edit


def _moved(old: str, new: str):
    """An attack moving artifact `old` to `new` (replacing it), hashes recomputed."""
    def attack(root: str) -> None:
        os.replace(os.path.join(root, old), os.path.join(root, new))

        def edit(m):
            m["artifacts"][new] = m["artifacts"].pop(old)
            m["kernels"] = [k for k in m["kernels"] if k["file"] != old]
            for k in m["kernels"]:
                if k["file"] == new:
                    k["sha256"] = m["artifacts"][new]["sha256"]
        rewrite(root, edit)
    return attack


_v4_as_v2 = _moved("cpu/x86-64-v4/sq.so", "cpu/x86-64-v2/sq.so")   # SIGILL on a v2 CPU
_sm90_as_sm80 = _moved("cuda/sm_90/sq.cubin", "cuda/sm_80/sq.cubin")


EDITED = "the manifest's group was edited"
ARTIFACT_ATTACKS = {     # attack -> (edit, group called, input shape, message)
    "cat output to plain": (
        lambda r: rewrite(r, _regroup("halves", "a, b = chunk(x, 2, dim=-1)\ny = b")),
        "halves", (4, 16), "cpu/x86-64-v2/halves.so was built for group IR"),
    "softmax output to row": (lambda r: rewrite(r, _regroup("soft", "y = logsumexp(x)")),
                              "soft", (64, 300), EDITED),
    "x*x to x+x": (lambda r: rewrite(r, _regroup("sq", "y = x + x")), "sq", (8,), EDITED),
    "v4 code under v2": (_v4_as_v2, "sq", (8,),
                         "cpu/x86-64-v2/sq.so describes target cpu:x86-64-v4, the manifest says "
                         "cpu:x86-64-v2"),
}


@pytest.mark.parametrize("attack", ARTIFACT_ATTACKS, ids=str)
def test_an_artifact_is_bound_to_the_group_abi_and_level_it_was_built_for(described, attack):
    """Before the fix the first two wrote past their outputs (SIGSEGV, heap corruption), the
    third returned x*x for x+x and the fourth ran v4 code as v2: each runs in a child process,
    with FUSEBUILD_CPU_ISA=x86-64-v2 so that the edited v2 file is the one called."""
    edit, group, shape, message = ARTIFACT_ATTACKS[attack]
    edit(described)
    code = f"""
import numpy as np
from fusebuild import runtime
from fusebuild.errors import BundleError
k = runtime.load({described!r})
try:
    y = k.{group}(np.full({shape!r}, 3, np.float32))
    print("RAN", y.ravel()[:4])
except BundleError as e:
    print("REFUSED", e)
"""
    env = {**os.environ, "FUSEBUILD_CPU_ISA": "x86-64-v2"}
    for argv in ([sys.executable, "-c", code],
                 [sys.executable, "-m", "fusebuild", "verify", described, "--numerics"],
                 [sys.executable, "-m", "fusebuild", "verify", described]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        out = r.stdout + r.stderr
        assert message in out and "refused before any call" in out, (argv[1:], out)
        assert "Traceback" not in out and r.returncode == (0 if "-c" in argv else 1), out


def test_the_described_bundle_passes_every_check(described):
    """The genuine bundle: every artifact's description (.so, cubin, PTX) is the manifest's."""
    report = verify(described, numerics=True)
    assert report.artifacts == 9 and report.symbols == 9
    k = runtime.load(described)
    np.testing.assert_array_equal(k.sq(np.arange(4, dtype=np.float32)), [0, 1, 4, 9])
    for rel in k.manifest["artifacts"]:
        data = open(os.path.join(described, rel), "rb").read()
        assert read_description(data, rel) == k.description(rel)


def _fake_cupy(capability: str, loaded: list):
    """The device queries and module loading of `CudaKernels`, for an imaginary GPU; `loaded`
    receives every image handed to the 'driver'."""
    module = types.SimpleNamespace(load=loaded.append, get_function=lambda name: name)
    runtime_ = types.SimpleNamespace(driverGetVersion=lambda: 13000,
                                     getDeviceProperties=lambda i: {"name": b"Imaginary GPU"})
    return types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda i: types.SimpleNamespace(compute_capability=capability),
        runtime=runtime_, function=types.SimpleNamespace(Module=lambda: module),
        driver=types.SimpleNamespace(CUDADriverError=RuntimeError)))


@pytest.mark.parametrize("edit, capability, message, verify_message", [
    (lambda r: rewrite(r, _regroup("sq", "y = x + x")), "90", EDITED, EDITED),
    (_sm90_as_sm80, "80", "cuda/sm_80/sq.cubin describes target cuda:sm_90, the manifest says "
     "cuda:sm_80", "it is for sm_90, not sm_80"),
], ids=["edited group", "moved arch"])
def test_a_cubin_is_bound_to_its_group_and_arch(described, monkeypatch, edit, capability,
                                                message, verify_message):
    """Checked before the cubin is handed to the driver (a fake cupy: no GPU needed)."""
    from fusebuild.runtime import cuda
    edit(described)
    loaded: list = []
    monkeypatch.setattr(cuda, "_cupy", lambda: _fake_cupy(capability, loaded))
    kernels = cuda.CudaKernels(runtime.load(described))
    with pytest.raises(BundleError, match=message):
        kernels.find("sq(f32:c)", 0, empty=False)
    assert loaded == []
    assert_cli_refuses([["verify", described]], verify_message)


def test_a_cubin_of_the_genuine_bundle_is_handed_to_the_driver(described, monkeypatch):
    from fusebuild.runtime import cuda
    loaded: list = []
    monkeypatch.setattr(cuda, "_cupy", lambda: _fake_cupy("90", loaded))
    kernels = cuda.CudaKernels(runtime.load(described))
    assert kernels.find("sq(f32:c)", 0, empty=False).function == "fb_sq__f32_c"
    assert loaded == [open(os.path.join(described, "cuda/sm_90/sq.cubin"), "rb").read()]


def test_a_pinned_id_admits_only_its_bundle(described, root, monkeypatch):
    """runtime.load(path, expect_id=...) and FUSEBUILD_BUNDLE_ID (the argument wins; empty is
    no pin)."""
    want = runtime.load(described).id
    other = runtime.load(root).id
    assert runtime.load(described, expect_id=want).id == want
    with pytest.raises(BundleError, match=f"is bundle {other}, but expect_id pins bundle {want}"):
        runtime.load(root, expect_id=want)
    monkeypatch.setenv("FUSEBUILD_BUNDLE_ID", want)
    assert runtime.load(described).id == want
    with pytest.raises(BundleError, match=f"is bundle {other}, but FUSEBUILD_BUNDLE_ID pins "
                                          f"bundle {want}"):
        runtime.load(root)
    assert runtime.load(root, expect_id=other).id == other
    archive = pack(described, os.path.join(os.path.dirname(described), "d.tar.gz"))
    assert runtime.load(archive).id == want
    monkeypatch.setenv("FUSEBUILD_BUNDLE_ID", "")
    assert runtime.load(root).id == other


def test_a_file_holds_the_kernels_of_one_group(described):
    def edit(m):                            # sq's v2 kernel said to live in halves.so
        k = next(k for k in m["kernels"] if k["group"] == "sq" and "v2" in k["target"])
        k.update(file="cpu/x86-64-v2/halves.so",
                 sha256=m["artifacts"]["cpu/x86-64-v2/halves.so"]["sha256"])
    rewrite(described, edit)
    with pytest.raises(BundleError, match="its file cpu/x86-64-v2/halves.so holds kernels of "
                                          "group halves"):
        runtime.load(described)


def test_a_cubin_compiled_on_the_fly_describes_itself(described, monkeypatch):
    """on_miss="jit" on the CUDA path: NVRTC in a child process, then the same check."""
    from fusebuild.runtime import cuda
    loaded: list = []
    monkeypatch.setattr(cuda, "_cupy", lambda: _fake_cupy("90", loaded))
    kernels = cuda.CudaKernels(runtime.load(described, on_miss="jit"))
    found = kernels.find("sq(f64:c)", 0, empty=False)
    assert found.entry["target"] == "cuda:sm_90" and len(loaded) == 1
    assert read_description(loaded[0], "jit") == kernels.bundle.description(found.entry["file"])
