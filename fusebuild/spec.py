"""Spec files (YAML, `fusebuild: 1`) -> groups and their ArgSpec matrix (a build plan).

The YAML is composed into nodes so every error can name file:line:column; bodies are parsed by
`body.parse_group`. Matrix shapes are symbolic (B, C, 4*H) and canonicalized with the same
`argspec.canonicalize` the runtime uses, so the planned keys are exactly the keys calls produce.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import yaml

from . import dtypes as dt
from . import targets as tg
from .argspec import (MAX_RANK, Dim, broadcast_shapes, canonicalize, contiguous_strides,
                      format_key, parse_key, row_strides)
from .errors import SpecError, UsageError
from .syntax import Group, SourceMap, parse_group
from .ir import instantiate
from .runtime.manifest import load_json, read_regular_file
from . import autodiff
from .abi import GRAD_SUFFIX

TOP_KEYS = ("fusebuild", "bundle", "targets", "groups")
GROUP_KEYS = ("name", "doc", "inputs", "outputs", "body", "matrix", "targets", "grad")
MATRIX_KEYS = ("dtype", "shapes", "strided")
DEFAULT_MAX_KERNELS = 20000
MAX_MISS_LOG_BYTES = 1 << 28
MAX_GROUP_NAME = 255 - len(".cubin")   # file names hold 255 bytes; <group>.cubin is the longest
MAX_BUNDLE_NAME = 200   # <name>-<version>, leaving room for temporary, shard and archive suffixes
_BUNDLE_FIELD = re.compile(r"^[A-Za-z0-9_.+-]+$")
DEFAULT_NAME, DEFAULT_VERSION = "kernels", "0.1.0"
_TARGETS_HINT = "targets are listed in the README, section Specs"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INPUT_TYPE = re.compile(r"^(tensor|scalar)(?:\(\s*([a-z0-9]+)\s*\))?$")


@dataclass(frozen=True)
class Variant:
    """One ArgSpec of a group: its key and the dtypes of the tensor inputs."""
    key: str
    dtypes: tuple[dt.DType, ...]


@dataclass(frozen=True)
class GroupPlan:
    group: Group
    variants: tuple[Variant, ...]
    targets: tuple[str, ...]
    file: str
    line: int
    shapes: tuple[dict, ...] = ()     # the symbolic shape patterns of the matrix
    forward: str = ""                 # a backward group derived by `grad:`: its forward group


@dataclass(frozen=True)
class Plan:
    name: str
    version: str
    groups: tuple[GroupPlan, ...]

    @property
    def n_kernels(self) -> int:
        return sum(len(g.variants) * len(g.targets) for g in self.groups)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for g in self.groups for t in g.targets))


# ---------------------------------------------------------------- YAML with positions ----------

class _Y:
    """A YAML node with its file, for errors that point at it."""

    def __init__(self, node: yaml.Node, file: str, text: str):
        self.node, self.file, self.text = node, file, text
        self.key_node: _Y | None = None    # set for mapping values: the node of their key

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    @property
    def col(self) -> int:
        return self.node.start_mark.column + 1

    def err(self, message: str, hint: str = "") -> SpecError:
        return SpecError(message, self.file, self.line, self.col, hint)

    def scalar(self):
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.err("expected a single value here", "write a scalar, not a list or mapping")
        try:
            return _construct(self.node)
        except (yaml.YAMLError, ValueError, OverflowError):
            kind = self.node.tag.rsplit(":", 1)[-1]
            raise self.err(f"cannot read {self.node.value!r} as a YAML {kind}",
                           "fix the value, or drop its !! tag") from None

    def str(self, what: str) -> str:
        v = self.scalar()
        if not isinstance(v, str):
            raise self.err(f"{what} must be a string, got {v!r}", "quote it if YAML reads it as a number")
        return v

    def mapping(self, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, "_Y"]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.err(f"{what} must be a mapping", "write `key: value` entries")
        out: dict[str, _Y] = {}
        for k, v in self.node.value:
            key = _Y(k, self.file, self.text)
            name = key.scalar()
            if not isinstance(name, str):
                raise key.err(f"keys of {what} must be names, got {name!r}", "quote the key")
            if name in out:
                raise key.err(f"duplicate key '{name}' in {what}", "give each key once")
            if allowed is not None and name not in allowed:
                raise key.err(f"unknown key '{name}' in {what}",
                              f"allowed keys: {', '.join(allowed)}")
            out[name] = _Y(v, self.file, self.text)
            out[name].key_node = key
        return out

    def seq(self, what: str) -> list["_Y"]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.err(f"{what} must be a list", "write [a, b] or one `- item` per line")
        return [_Y(n, self.file, self.text) for n in self.node.value]


def _construct(node: yaml.ScalarNode):
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


MAX_YAML_DEPTH = 32   # a spec nests 8 deep (groups > group > matrix > shapes > pattern > dims)
_STD_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq",
                                                 "map")}


class _Loader(yaml.SafeLoader):
    """SafeLoader that composes plain YAML only: bounded nesting, standard tags, no merge keys,
    and no timestamps or `=` values (those read as strings)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers
                if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self.file, self.depth = file, 0

    def _too_deep(self, mark) -> SpecError:
        return SpecError(f"YAML nested more than {MAX_YAML_DEPTH} levels deep", self.file,
                         mark.line + 1, mark.column + 1,
                         "a spec nests lists and mappings about 8 deep; close brackets or "
                         "flatten it")

    def fetch_flow_collection_start(self, token_class):
        if self.flow_level >= MAX_YAML_DEPTH:   # before the scanner's lookahead gets quadratic
            raise self._too_deep(self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise self._too_deep(mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        if node.tag == "tag:yaml.org,2002:merge":
            raise SpecError("YAML merge keys (`<<`) are not supported", self.file, mark.line + 1,
                            mark.column + 1, "write the keys out, or reuse a whole value with an "
                            "anchor and an alias (&m ... *m)")
        if node.tag not in _STD_TAGS:
            raise SpecError(f"YAML tag '{node.tag}' is not allowed in a spec", self.file,
                            mark.line + 1, mark.column + 1,
                            "write plain strings, numbers, lists and mappings, without ! tags")
        return node


def _decode(data: bytes, path: str) -> str:
    """The text of a spec file: UTF-8 (an initial BOM allowed), else a located SpecError."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpecError("the spec file is UTF-16 text", path, 1, 1, "save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        col = len(data[line_start:e.start].decode("utf-8", "replace")) + 1
        raise SpecError(f"the spec file is not valid UTF-8 (byte 0x{data[e.start]:02x})", path,
                        data.count(b"\n", 0, e.start) + 1, col, "save it as UTF-8") from None


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of character `index` of `text`."""
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def _compose(path: str) -> _Y:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpecError(f"cannot read spec file: {e.strerror}", path, 0, 0,
                        "check the path and its permissions") from None
    text = _decode(data, path)
    try:
        loader = _Loader(text, path)
    except yaml.reader.ReaderError as e:
        nul = e.character == 0
        raise SpecError("the spec file contains " + ("a NUL character" if nul else
                                                     f"the control character U+{e.character:04X}"),
                        path, *_position(text, e.position), "spec files are UTF-8 text" +
                        (" (NUL bytes suggest UTF-16: save it as UTF-8)" if nul else "")) from None
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise SpecError(f"malformed YAML: {e.problem or e.context}", path,
                        mark.line + 1 if mark else 1, mark.column + 1 if mark else 1,
                        "check indentation and quoting") from None
    finally:
        loader.dispose()
    if node is None:
        raise SpecError("empty spec file", path, 1, 1, "start with `fusebuild: 1`")
    return _Y(node, path, text)


def _body_source_map(y: _Y) -> SourceMap:
    node = y.node
    if node.style in ("|", ">"):
        n = len(node.value.rstrip("\n").split("\n"))
        first = node.start_mark.line + 1      # 0-based index of the first content line
        content = [ln for ln in y.text.splitlines()[first:first + n] if ln.strip()]
        indent = min((len(ln) - len(ln.lstrip(" ")) for ln in content), default=0)
        return SourceMap(y.file, first + 1, (indent + 1,) * n)
    quote = 1 if node.style in ("'", '"') else 0
    return SourceMap(y.file, y.line, (y.col + quote,))


# ---------------------------------------------------------------- spec -> plan -----------------

def spec_files(paths: list[str]) -> list[str]:
    """Spec files named directly or found (*.yaml, *.yml, sorted) under directories."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names)
                          if n.endswith((".yaml", ".yml"))]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise SpecError("no such spec file or directory", p, 0, 0,
                            "pass spec files or directories holding *.yaml files")
    if not files:
        raise SpecError("no spec files (*.yaml, *.yml) found", ", ".join(paths), 0, 0,
                        "spec files end in .yaml or .yml")
    return files


def load_plan(paths: list[str], targets: list[str] | None = None, name: str | None = None,
              version: str | None = None, max_kernels: int = DEFAULT_MAX_KERNELS) -> Plan:
    """Parse every spec under `paths` into a build plan; raises SpecError."""
    groups: list[GroupPlan] = []
    seen: dict[str, GroupPlan] = {}
    bundle: tuple[str, str, _Y] | None = None
    total = 0
    cli_targets = None
    if targets:
        expanded: list[str] = []
        for t in targets:
            try:
                expanded += [x for x in tg.buildable([t]) if x not in expanded]
            except ValueError as e:
                raise UsageError(f"--target {t}: {e}") from None
        cli_targets = tuple(expanded)
    for path in spec_files(paths):
        top = _compose(path)
        doc = top.mapping("the spec file", TOP_KEYS)
        if "fusebuild" not in doc:
            raise top.err("missing `fusebuild: 1` at the top of the spec",
                          "every spec file starts with `fusebuild: 1`")
        if doc["fusebuild"].scalar() != 1:
            raise doc["fusebuild"].err(f"unsupported spec version {doc['fusebuild'].scalar()!r}",
                                       "this fusebuild reads `fusebuild: 1`")
        if "bundle" in doc:
            b = doc["bundle"].mapping("bundle", ("name", "version"))
            this = (_bundle_field(b, "name", DEFAULT_NAME),
                    _bundle_field(b, "version", DEFAULT_VERSION))
            if bundle and this != bundle[:2] and not (name and version):
                raise doc["bundle"].err(
                    f"bundle {this[0]}-{this[1]} conflicts with {bundle[0]}-{bundle[1]} "
                    f"declared at {bundle[2].file}:{bundle[2].line}",
                    "declare the bundle once, or pass --name/--version")
            bundle = bundle or (*this, doc["bundle"])
        file_targets = _targets(doc["targets"]) if "targets" in doc else None
        if "groups" not in doc:
            raise top.err("the spec has no `groups:`", "add a `groups:` list of fusion groups")
        for gy in doc["groups"].seq("groups"):
            for gp in _group_plans(gy, cli_targets, file_targets):
                if gp.group.name in seen:
                    first = seen[gp.group.name]
                    raise gy.mapping("group")["name"].err(
                        f"duplicate group '{gp.group.name}' (first defined at "
                        f"{first.file}:{first.line})", "group names must be unique across all "
                        "specs (a group with grad: also defines <name>__grad)")
                seen[gp.group.name] = gp
                total += len(gp.variants) * len(gp.targets)
                if total > max_kernels:
                    where = gy.mapping("group").get("matrix", gy)
                    raise where.err(f"the build would have {total}+ kernels, over the limit of "
                                    f"{max_kernels}", "narrow the matrix or raise --max-kernels")
                groups.append(gp)
    final_name = name or (bundle[0] if bundle else DEFAULT_NAME)
    final_version = version or (bundle[1] if bundle else DEFAULT_VERSION)
    for v, what, given in ((final_name, "name", name), (final_version, "version", version)):
        if not re.match(r"^[A-Za-z0-9_.+-]+$", v):
            message = f"bundle {what} {v!r} may only hold letters, digits and _ . + -"
            if given:
                raise UsageError(f"--{what} {v}: {message}")
            raise bundle[2].err(message)
    if len(f"{final_name}-{final_version}") > MAX_BUNDLE_NAME:
        message = (f"bundle name and version are {len(final_name) + 1 + len(final_version)} "
                   f"characters long; at most {MAX_BUNDLE_NAME} fit the bundle's file names")
        if name or version:
            raise UsageError(f"--{'name' if name else 'version'}: {message}")
        raise bundle[2].err(message, "shorten the name")
    return Plan(final_name, final_version, tuple(groups))


def _bundle_field(b: dict[str, _Y], what: str, default: str) -> str:
    """The bundle's name or version as written (`version: 1.10` stays 1.10)."""
    if what not in b:
        return default
    y = b[what]
    value = y.str("bundle name") if what == "name" else y.node.value if y.scalar() is not None \
        else ""
    if not _BUNDLE_FIELD.match(value):
        raise y.err(f"bundle {what} {value!r} may only hold letters, digits and _ . + -",
                    "e.g. bundle: {name: demo, version: 0.1.0}")
    return value


def _targets(y: _Y) -> tuple[str, ...]:
    out: list[str] = []
    for item in y.seq("targets"):
        try:
            out += [t for t in tg.buildable([item.str("a target")]) if t not in out]
        except ValueError as e:
            raise item.err(str(e), _TARGETS_HINT) from None
    return tuple(out)


def _input_decls(y: _Y) -> list[tuple[str, str, dt.DType | None]]:
    out = []
    for name, ty in y.mapping("inputs").items():
        if not _IDENT.match(name):
            raise ty.key_node.err(f"input name '{name}' is not an identifier",
                                  "use letters, digits and _")
        text = ty.str(f"the type of input '{name}'").strip()
        m = _INPUT_TYPE.match(text)
        if not m:
            raise ty.err(f"unknown input type '{text}'",
                         "use tensor, tensor(float32) or scalar(float32)")
        kind, dname = m.groups()
        d = _dtype(dname, ty) if dname else None
        if kind == "scalar" and d is None:
            raise ty.err(f"scalar input '{name}' needs a dtype", "write scalar(float32)")
        out.append((name, kind, d))
    if not out:
        raise y.err("a group needs inputs", "inputs: {x: tensor}")
    return out


def _dtype(name: str, y: _Y) -> dt.DType:
    try:
        return dt.lookup(name)
    except KeyError:
        raise y.err(f"unknown dtype '{name}'",
                    f"known dtypes: {', '.join(d.name for d in dt.ALL)}") from None


def _output_decls(y: _Y, inputs) -> list[tuple[str, dt.DType | None]]:
    if isinstance(y.node, yaml.SequenceNode):
        items = [(o.str("an output name"), None, o) for o in y.seq("outputs")]
    else:
        items = [(k, None if v.scalar() is None else _dtype(str(v.scalar()), v), v.key_node)
                 for k, v in y.mapping("outputs").items()]
    names = {n for n, _, _ in inputs}
    seen = set()
    for name, _, where in items:
        if not _IDENT.match(name):
            raise where.err(f"output name '{name}' is not an identifier", "use letters, digits and _")
        if name in names:
            raise where.err(f"output '{name}' has the name of an input", "rename one of them")
        if name in seen:
            raise where.err(f"duplicate output '{name}'", "list each output once")
        seen.add(name)
    if not items:
        raise y.err("a group needs at least one output", "outputs: [y]")
    return [(n, d) for n, d, _ in items]


def _group_plans(gy: _Y, cli_targets: tuple[str, ...] | None,
                 file_targets: tuple[str, ...] | None) -> list[GroupPlan]:
    """The plan of one spec group, and of its backward group when it has `grad:`."""
    g = gy.mapping("group", GROUP_KEYS)
    for req in ("name", "inputs", "outputs", "body"):
        if req not in g:
            raise gy.err(f"group is missing `{req}:`", "a group has name, inputs, outputs, body, matrix")
    name = g["name"].str("group name")
    if not _IDENT.match(name):
        raise g["name"].err(f"group name '{name}' is not an identifier",
                            "use letters, digits and _ (it becomes part of C symbols)")
    if name.endswith(GRAD_SUFFIX):
        forward = name[:-len(GRAD_SUFFIX)]
        raise g["name"].err(f"group name '{name}' ends with '{GRAD_SUFFIX}', which is reserved "
                            "for the backward groups fusebuild derives",
                            f"list the inputs to differentiate under `grad:` in group "
                            f"'{forward}' (e.g. `grad: [x]`) instead of writing its backward, or "
                            "rename this group")
    longest = MAX_GROUP_NAME - (len(GRAD_SUFFIX) if "grad" in g else 0)
    if len(name) > longest:
        raise g["name"].err(f"group name is {len(name)} characters long; at most "
                            f"{longest} fit a file name", "shorten it (its artifacts "
                            "are files named <group>.cubin, <group>.so" +
                            (", and <group>__grad.cubin for its backward)" if "grad" in g else ")"))
    inputs = _input_decls(g["inputs"])
    outputs = _output_decls(g["outputs"], inputs)
    body_y = g["body"]
    group = parse_group(name, inputs, outputs, body_y.str("body"), _body_source_map(body_y),
                        g["doc"].str("doc") if "doc" in g else "")
    group_targets = _targets(g["targets"]) if "targets" in g else None
    targets = cli_targets or group_targets or file_targets or tg.expand(["cpu"])
    matrix = _Matrix.parse(group, g.get("matrix"), gy)
    plans = [GroupPlan(group, matrix.variants(group), targets, gy.file, gy.line, matrix.shapes)]
    if "grad" in g:
        bwd, bmatrix = _backward(group, matrix, g["grad"])
        plans.append(GroupPlan(bwd, bmatrix.variants(bwd), targets, gy.file, gy.line,
                               bmatrix.shapes, group.name))
    return plans


def _grad_inputs(group: Group, y: _Y, matrix: "_Matrix") -> tuple[str, ...]:
    """The inputs listed under `grad:`: float tensor inputs of the group, each once."""
    items = y.seq("grad")
    if not items:
        raise y.err("grad: lists no input", "e.g. grad: [x, bias]")
    decls = {i.name: i for i in group.inputs}
    names: list[str] = []
    for item in items:
        name = item.str("an input name")
        decl = decls.get(name)
        if decl is None:
            raise item.err(f"'{name}' is not an input of group '{group.name}'",
                           f"grad: lists tensor inputs: {', '.join(i.name for i in group.tensor_inputs)}")
        if decl.kind != "tensor":
            raise item.err(f"'{name}' is a scalar input: scalars are not differentiated",
                           f"declare it `{name}: tensor` to get its gradient")
        if name in names:
            raise item.err(f"'{name}' is listed twice", "list each input once")
        bad = sorted({d[name].name for d, _ in matrix.dtype_maps if not d[name].is_float})
        if bad:
            raise item.err(f"'{name}' is {' and '.join(bad)} in the matrix: only float inputs "
                           "have gradients", "drop it from grad:, or give it float dtypes")
        names.append(name)
    return tuple(names)


def _backward(group: Group, matrix: "_Matrix", y: _Y) -> tuple[Group, "_Matrix"]:
    """The backward group (`autodiff.derive`) and its matrix: the forward one with the output
    gradients `grad_<o>` at the outputs' shapes and dtypes."""
    wrt = _grad_inputs(group, y, matrix)
    bwd = autodiff.derive(group, wrt, SourceMap(y.file, y.line, (y.col,)))
    seeds = [i.name for i in bwd.inputs[len(group.inputs):]]
    dtype_maps = []
    for dmap, dy in matrix.dtype_maps:
        outs = {o.name: o.dtype for o in instantiate(group, dmap).outputs}
        full = {**dmap, **{s: outs[s[len("grad_"):]] for s in seeds}}
        try:
            instantiate(bwd, full)
        except SpecError as e:
            raise y.err(f"the backward of group '{group.name}' does not type for "
                        f"{', '.join(f'{k}: {v.name}' for k, v in dmap.items())}: {e.message}",
                        "report this as a fusebuild bug, with the group") from None
        dtype_maps.append((full, dy))
    shapes = [{**shape, **{s: _output_shape(group, shape, s[len("grad_"):], sy) for s in seeds}}
              for shape, sy in zip(matrix.shapes, matrix.shape_nodes)]
    return bwd, _Matrix(dtype_maps, tuple(shapes), matrix.shape_nodes, matrix.strided)


def _dtype_maps(group: Group, y: _Y | None, where: _Y) -> list[tuple[dict[str, dt.DType], _Y]]:
    free = [i.name for i in group.tensor_inputs if i.dtype is None]
    fixed = {i.name: i.dtype for i in group.tensor_inputs if i.dtype is not None}
    if y is None:
        if free:
            raise where.err("matrix.dtype is required: inputs " + ", ".join(free) +
                            " have no fixed dtype", "add `dtype: [float32]` under matrix")
        return [(dict(fixed), where)]
    maps = []
    for item in y.seq("matrix.dtype"):
        if isinstance(item.node, yaml.MappingNode):
            m = {}
            for k, v in item.mapping("a dtype map").items():
                if k not in {i.name for i in group.tensor_inputs}:
                    raise v.key_node.err(f"'{k}' is not a tensor input of group '{group.name}'",
                                         "name the group's tensor inputs")
                m[k] = _dtype(str(v.scalar()), v)
                if k in fixed and m[k] != fixed[k]:
                    raise v.err(f"input '{k}' is fixed to {fixed[k].name}", "leave fixed inputs out of dtype maps")
            missing = [n for n in free if n not in m]
            if missing:
                raise item.err(f"dtype map does not give a dtype for {', '.join(missing)}",
                               "give every input without a fixed dtype")
            maps.append(({**fixed, **m}, item))
        else:
            d = _dtype(str(item.scalar()), item)
            maps.append(({**fixed, **{n: d for n in free}}, item))
    if not maps:
        raise y.key_node.err("matrix.dtype lists no dtype", "e.g. dtype: [float32]")
    return maps


def _parse_dim(y: _Y) -> int | Dim:
    v = y.scalar()
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise y.err(f"dimension size {v} must be >= 1", "use 1 for a broadcast dimension")
        return v
    text = str(v).replace(" ", "")
    coef, syms = 1, []
    for term in text.split("*"):
        if term.isdigit():
            coef *= int(term)
        elif _IDENT.match(term):
            syms.append(term)
        else:
            raise y.err(f"bad dimension '{v}'", "use an integer, a symbol (B) or a product (4*H)")
    return Dim(coef, tuple(syms)) if syms else coef


@dataclass(frozen=True)
class _Matrix:
    """A group's parsed `matrix:`: dtype assignments, symbolic shape patterns, strided."""
    dtype_maps: list            # [(dict input -> DType, _Y where written)]
    shapes: tuple               # per pattern: dict input -> symbolic shape
    shape_nodes: tuple          # per pattern: its _Y
    strided: bool

    @staticmethod
    def parse(group: Group, matrix: _Y | None, gy: _Y) -> "_Matrix":
        m = matrix.mapping("matrix", MATRIX_KEYS) if matrix is not None else {}
        where = matrix or gy
        dtype_maps = _dtype_maps(group, m.get("dtype"), where)
        if "shapes" not in m:
            raise where.err("matrix.shapes is required", "e.g. shapes: [{x: [N]}]")
        strided = bool(m["strided"].scalar()) if "strided" in m else False
        shape_nodes = tuple(m["shapes"].seq("matrix.shapes"))
        if not shape_nodes:
            raise m["shapes"].key_node.err("matrix.shapes lists no shape pattern",
                                           "e.g. shapes: [{x: [N]}]")
        shapes = tuple(_shape_pattern(group, s) for s in shape_nodes)
        return _Matrix(dtype_maps, shapes, shape_nodes, strided)

    def variants(self, group: Group) -> tuple[Variant, ...]:
        """Every (dtype assignment, canonical layout) key of `group` over this matrix."""
        patterns = [_layouts(group, shape, s) for shape, s in zip(self.shapes, self.shape_nodes)]
        if self.strided:   # the general-stride kernel of each pattern's rank
            n = len(group.tensor_inputs)
            patterns += [("s" * r,) * n for r in sorted({max(len(v) for v in shape.values())
                                                       for shape in self.shapes}) if r]
        out: dict[str, Variant] = {}
        for dmap, _ in self.dtype_maps:
            instantiate(group, dmap)   # type-check this dtype assignment
            dts = tuple(dmap[i.name] for i in group.tensor_inputs)
            for layouts in patterns:
                key = format_key(group.name, list(zip(dts, layouts)))
                out.setdefault(key, Variant(key, dts))
        return tuple(out.values())


def _shape_pattern(group: Group, sy: _Y) -> dict[str, tuple]:
    shapes = {}
    tensor_names = [i.name for i in group.tensor_inputs]
    for k, v in sy.mapping("a shape pattern").items():
        if k not in tensor_names:
            raise v.key_node.err(f"'{k}' is not a tensor input of group '{group.name}'",
                                 "shape patterns name tensor inputs only")
        dims = v.seq(f"the shape of '{k}'")
        if len(dims) > MAX_RANK:
            raise v.err(f"the shape of '{k}' has {len(dims)} dims; arrays have at most "
                        f"{MAX_RANK}", f"give at most {MAX_RANK} dims")
        shapes[k] = tuple(_parse_dim(d) for d in dims)
    missing = [n for n in tensor_names if n not in shapes]
    if missing:
        raise sy.err(f"shape pattern gives no shape for {', '.join(missing)}",
                     "give a shape for every tensor input")
    return shapes


def _views(group: Group, shapes: dict[str, tuple], sy: _Y) -> list[tuple[tuple, tuple]]:
    """(shape, strides) of each tensor input as the kernel sees it (chunks divided)."""
    views = []
    for inp in group.tensor_inputs:
        shape = shapes[inp.name]
        strides = contiguous_strides(shape)
        if inp.chunk:
            n, dim = inp.chunk
            d = dim + len(shape) if dim < 0 else dim
            if not 0 <= d < len(shape):
                raise sy.err(f"chunk(..., dim={dim}) is out of range for '{inp.name}' of rank "
                             f"{len(shape)}", "fix the chunk dim or the shape pattern")
            size = shape[d]
            if not (Dim.of(size).divisible(n)):
                raise sy.err(f"chunk({inp.name}, {n}, dim={dim}): size {size} is not known to be "
                             f"divisible by {n}", f"write the size as {n}*{size}")
            shape = shape[:d] + (Dim.of(size) // n if isinstance(size, Dim) else size // n,) + \
                shape[d + 1:]
        views.append((shape, strides))
    return views


def _iteration_shape(group: Group, views: list, sy: _Y) -> tuple:
    try:
        it_shape = broadcast_shapes([s for s, _ in views])
    except ValueError as e:
        raise sy.err(f"shapes do not broadcast: {e}",
                     "inputs broadcast like numpy (right-aligned, size 1 stretches)") from None
    if group.reduces:
        _check_reduced_dims(group, len(it_shape), sy)
    return it_shape


def _shape_of(out, it_shape: tuple, sy: _Y) -> tuple:
    """The symbolic shape of output `out` for the iteration shape."""
    if out.row:
        return it_shape[:-1] + (1,)
    if not out.cat:
        return it_shape
    n, dim = out.cat
    d = dim + len(it_shape) if dim < 0 else dim
    if not 0 <= d < len(it_shape):
        raise sy.err(f"cat(..., dim={dim}) of output '{out.name}' is out of range for "
                     f"rank {len(it_shape)}", "fix the cat dim or the shape pattern")
    return it_shape[:d] + (it_shape[d] * n,) + it_shape[d + 1:]


def _output_shape(group: Group, shapes: dict[str, tuple], name: str, sy: _Y) -> tuple:
    it_shape = _iteration_shape(group, _views(group, shapes, sy), sy)
    return _shape_of(next(o for o in group.outputs if o.name == name), it_shape, sy)


def _layouts(group: Group, shapes: dict[str, tuple], sy: _Y) -> tuple[str, ...]:
    """Canonical layouts of one symbolic shape pattern (all operands C-contiguous)."""
    views = _views(group, shapes, sy)
    it_shape = _iteration_shape(group, views, sy)
    extra = [row_strides(it_shape) if out.row else
             contiguous_strides(_shape_of(out, it_shape, sy)) for out in group.outputs]
    return canonicalize(it_shape, views, extra, keep_last=group.reduces).layouts


def _check_reduced_dims(group: Group, rank: int, sy: _Y) -> None:
    """Reduction groups reduce the last dim of shapes of rank >= 1; a dim= written as a
    non-negative index must name it in every shape pattern."""
    if rank == 0:
        raise sy.err(f"group '{group.name}' reduces over the last dim, but this shape pattern "
                     "has rank 0", "give the inputs at least one dim, e.g. {x: [N]}")
    for dim, line, col in group.dims:
        if dim != rank - 1:
            raise group.source.error(
                f"dim={dim} is not the last dim of the shape pattern at line {sy.line} (rank "
                f"{rank}): reductions reduce the last dim only", line, col,
                "write dim=-1")



@dataclass(frozen=True)
class MissFold:
    """What `add_misses` made of a miss log."""
    plan: Plan
    added: int                       # logged keys new to the plan
    duplicates: int                  # records of a key seen before in the log
    other_groups: int                # records of groups not in these specs
    bad: tuple[str, ...]             # 'LOG:LINE: why' per record skipped as invalid
    unbuilt: tuple[str, ...]         # targets misses were logged for that the plan does not build
    backward: int = 0                # backward keys new to the plan, of added forward keys
    underived: tuple[str, ...] = ()  # added forward keys whose backward key the log cannot tell


def add_misses(plan: Plan, log_path: str, max_kernels: int = DEFAULT_MAX_KERNELS) -> MissFold:
    """Fold the keys of a runtime miss log (JSON lines with "key" and "target") into the plan;
    a forward key of a group with `grad:` brings the key its backward call selects.

    Invalid records (bad JSON or key, wrong arity or rank, a dtype the spec fixes, a type error)
    are skipped and reported, identical keys counted once; an unreadable log (a FIFO or device
    included) is a SpecError, and a fold past `max_kernels` kernels a UsageError.
    """
    try:
        text = read_regular_file(log_path, MAX_MISS_LOG_BYTES).decode("utf-8", "replace")
    except OSError as e:
        raise SpecError(f"cannot read miss log: {e.strerror}", log_path, 0, 0,
                        "pass the file FUSEBUILD_MISS_LOG pointed to") from None
    groups = {gp.group.name: gp for gp in plan.groups}
    backward = {gp.forward: gp for gp in plan.groups if gp.forward}
    planned = {gp.group.name: {v.key for v in gp.variants} for gp in plan.groups}
    added: dict[str, dict[str, Variant]] = {}
    seen: set[str] = set()
    duplicates = other = derived = 0
    total = plan.n_kernels
    bad, bad_keys, unbuilt, underived = [], set(), {}, []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = load_json(line)
            key, target = rec["key"], rec.get("target")
            group, descs = parse_key(key)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            bad.append(f"{log_path}:{n}: not a miss record ({type(e).__name__}: {e}); each line "
                       'is {"key": "group(f32:c,...)", "target": ...}')
            continue
        gp = groups.get(group)
        if gp is None:
            other += 1
            continue
        if key in seen:
            duplicates += 1
        else:
            seen.add(key)
            why = _miss_problem(gp.group, descs)
            if why:
                bad.append(f"{log_path}:{n}: {key}: {why}")
                bad_keys.add(key)
                continue
            found = _with_backward(gp, backward.get(group), key)
            if group in backward and len(found) == 1 and key not in planned[group]:
                underived.append(key)
            for g, v in found:
                if v.key not in planned[g.group.name]:
                    planned[g.group.name].add(v.key)
                    added.setdefault(g.group.name, {})[v.key] = v
                    total += len(g.targets)
                    derived += g is not gp
            if total > max_kernels:
                raise UsageError(f"--add-misses {log_path}: with the keys logged up to line "
                                 f"{n} the build would have {total} kernels, over the limit of "
                                 f"{max_kernels}; raise --max-kernels or trim the log")
        if key not in bad_keys and isinstance(target, str) and target not in gp.targets:
            unbuilt[target] = None
    new_groups = tuple(dataclasses.replace(gp, variants=gp.variants + tuple(
        added.get(gp.group.name, {}).values())) for gp in plan.groups)
    return MissFold(dataclasses.replace(plan, groups=new_groups),
                    sum(map(len, added.values())) - derived, duplicates, other, tuple(bad),
                    tuple(sorted(unbuilt)), derived, tuple(underived))


def _with_backward(gp: GroupPlan, bwd: GroupPlan | None, key: str
                   ) -> list[tuple[GroupPlan, Variant]]:
    """The variant of a logged `key` of `gp`, and of its backward group `bwd` (if any) the
    variant its backward calls select."""
    found = [(gp, Variant(key, tuple(d for d, _ in parse_key(key)[1])))]
    bkey = _backward_key(gp, bwd, key) if bwd else None
    if bkey and not _miss_problem(bwd.group, parse_key(bkey)[1]):
        found.append((bwd, Variant(bkey, tuple(d for d, _ in parse_key(bkey)[1]))))
    return found


def _backward_key(fwd: GroupPlan, bwd: GroupPlan, key: str) -> str | None:
    """The key of `bwd`, the backward group of `fwd`, that the backward of a call of `key`
    selects (autograd passes the saved inputs and C-contiguous output gradients); None where
    the layouts of `key` do not tell it (a group with cat outputs, at a layout no shape
    pattern of its matrix has)."""
    group, grad = fwd.group, bwd.group
    dtypes = [d for d, _ in parse_key(key)[1]]
    layouts = tuple(lay for _, lay in parse_key(key)[1])
    outs = {o.name: o.dtype for o in
            instantiate(group, {i.name: d for i, d in zip(group.tensor_inputs, dtypes)}).outputs}
    seeds = [i.name[len("grad_"):] for i in grad.tensor_inputs[len(group.tensor_inputs):]]
    found = _pattern_backward(fwd, bwd, layouts) or _canonical_backward(group, grad, layouts)
    if found is None:
        return None
    return format_key(grad.name, list(zip(dtypes + [outs[o] for o in seeds], found)))


def _pattern_backward(fwd: GroupPlan, bwd: GroupPlan, layouts: tuple) -> tuple | None:
    """The backward layouts of the matrix's first shape pattern whose forward layouts are
    `layouts` (the build pairs them so), or None."""
    for fshape, bshape in zip(fwd.shapes, bwd.shapes):     # checked: no error to locate
        if _layouts(fwd.group, fshape, None) == layouts:
            return _layouts(bwd.group, bshape, None)
    return None


def _canonical_backward(group: Group, grad: Group, layouts: tuple) -> tuple | None:
    """The backward layouts of a forward call whose canonical layouts are `layouts`, from a
    call in that canonical form (sizes 2, strides by letter: c dense, b 0, s odd, so no
    two dims merge anew); None for groups with cat outputs, whose strides the key omits."""
    if any(o.cat for o in group.outputs + grad.outputs):
        return None
    sizes = (2,) * (len(layouts[0]) if layouts else 0)
    dense = contiguous_strides(sizes)

    def strides(o) -> tuple:
        return row_strides(sizes) if o.row else dense

    inputs = [(sizes, tuple(0 if c == "b" else d if c == "c" else 2 * d + 1
                            for c, d in zip(lay, dense))) for lay in layouts]
    outs = [strides(o) for o in group.outputs]
    if canonicalize(sizes, inputs, outs, keep_last=group.reduces).layouts != layouts:
        return None
    by_name = {o.name: o for o in group.outputs}
    seeds = [(sizes, strides(by_name[i.name[len("grad_"):]]))
             for i in grad.tensor_inputs[len(group.tensor_inputs):]]
    return canonicalize(sizes, inputs + seeds, [strides(o) for o in grad.outputs],
                        keep_last=grad.reduces).layouts


def _miss_problem(group: Group, descs: tuple) -> str:
    """Why a logged key cannot be built for `group` ('' if it can)."""
    inputs = group.tensor_inputs
    if len(descs) != len(inputs):
        return (f"has {len(descs)} tensor inputs, group '{group.name}' {len(inputs)} (the log "
                "comes from a bundle built from other specs)")
    fixed = [f"input '{i.name}' is fixed to {i.dtype.name}, the key has {d.name}"
             for i, (d, _) in zip(inputs, descs) if i.dtype is not None and i.dtype != d]
    if fixed:
        return "; ".join(fixed)
    if descs and len(descs[0][1]) > MAX_RANK:
        return f"has rank {len(descs[0][1])}; arrays have at most {MAX_RANK} dims"
    if group.reduces and any(not lay for _, lay in descs):
        return f"has rank 0, but group '{group.name}' reduces over the last dim: its keys " \
            "have rank >= 1"
    try:
        instantiate(group, {i.name: d for i, (d, _) in zip(inputs, descs)})
    except SpecError as e:
        return f"does not type-check: {e.message}"
    return ""
