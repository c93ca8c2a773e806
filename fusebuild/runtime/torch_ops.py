"""A bundle's groups as torch custom ops (DESIGN §9): `Bundle.torch_library(namespace)`.

Every group `g` becomes `torch.ops.<namespace>.g`, served by the bundle's kernels on CPU and
CUDA tensors, with a fake (meta) implementation that derives output shapes and dtypes from the
group's IR. A group whose backward group `g__grad` is in the bundle gets an autograd formula
that saves only the inputs and calls `torch.ops.<namespace>.g__grad`; the backward ops refuse a
second derivative. Imported (and torch with it) only by `Bundle.torch_library`.
"""
from __future__ import annotations

import torch

from .. import dtypes as dt
from ..errors import ArgumentError, KernelNotFound, SpecError, UsageError
from ..text import plural
from .dispatch import GRAD, GroupInfo

_SCHEMA_TYPES = {"f": "float", "i": "int", "u": "int", "b": "bool"}
_LIBRARIES: dict[str, "TorchOps"] = {}      # namespace -> the ops registered there


class TorchOps:
    """The torch ops of one bundle in one namespace: `ops.bias_gelu` is
    `torch.ops.<namespace>.bias_gelu`."""

    def __init__(self, namespace: str, bundle, lib, ops: dict, backward: tuple[str, ...]):
        self._namespace, self._bundle, self._lib = namespace, bundle, lib
        self._ops, self._backward = ops, backward

    def __getattr__(self, name: str):
        ops = self.__dict__.get("_ops", {})
        if name in ops:
            return ops[name]
        raise AttributeError(f"torch.ops.{self.__dict__.get('_namespace')} holds no op '{name}' "
                             f"of this bundle; ops: {', '.join(ops)}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._ops))

    def __repr__(self) -> str:
        b = self._bundle
        return (f"<fusebuild torch ops torch.ops.{self._namespace}: "
                f"{plural(len(self._ops), 'op')} of bundle {b.name}-{b.version} {b.id[:12]}, "
                f"autograd for {', '.join(self._backward) or 'none'}>")


def torch_library(bundle, namespace: str) -> TorchOps:
    """Register every group of `bundle` as `torch.ops.<namespace>.<group>` (once per bundle id
    and namespace: a repeated call returns the same object); UsageError for a namespace that
    another bundle, torch or a library already uses."""
    found = _LIBRARIES.get(namespace)
    if found is not None:
        if found._bundle.id == bundle.id:
            return found
        b = found._bundle
        raise UsageError(f"torch namespace '{namespace}' already holds the ops of bundle "
                         f"{b.name}-{b.version} ({b.id[:12]}); pick another namespace for bundle "
                         f"{bundle.name}-{bundle.version} ({bundle.id[:12]})")
    _check_namespace(namespace, bundle.groups)
    lib = torch.library.Library(namespace, "FRAGMENT")
    infos = {name: bundle[name].info for name in bundle.groups}
    for name, info in infos.items():
        lib.define(schema(info))
        caller = bundle[name]     # the C fast path itself, seed= and offset= included
        lib.impl(name, caller, "CPU")
        lib.impl(name, _detaching(caller), "CUDA")
        torch.library.register_fake(f"{namespace}::{name}", _fake(bundle, info), lib=lib)
    backward = tuple(n for n in infos if n + GRAD in infos)
    for name in backward:
        _register_autograd(lib, namespace, infos[name], infos[name + GRAD])
    for name in infos:
        if name.endswith(GRAD) and name[:-len(GRAD)] in infos:
            _refuse_double_backward(lib, namespace, infos[name])
    space = getattr(torch.ops, namespace)
    ops = TorchOps(namespace, bundle, lib, {n: getattr(space, n) for n in infos}, backward)
    _LIBRARIES[namespace] = ops
    return ops


def _check_namespace(namespace: str, groups: tuple[str, ...]) -> None:
    """UsageError unless `namespace` is a free torch.ops namespace that fits every group."""
    if not namespace.isidentifier():
        raise UsageError(f"torch namespace {namespace!r} is not an identifier")
    prefix = namespace + "::"
    taken = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))
    if taken:
        more = ", ..." if len(taken) > 3 else ""
        raise UsageError(f"torch namespace '{namespace}' already holds "
                         f"{plural(len(taken), 'op')} ({', '.join(taken[:3])}{more}) not of a "
                         "fusebuild bundle: pick another namespace")
    space = getattr(torch.ops, namespace)
    if not isinstance(space, torch._ops._OpNamespace):
        raise UsageError(f"torch.ops.{namespace} is not an op namespace: pick another name")
    clash = [g for g in groups if g in dir(type(space)) or g in vars(space)]
    if clash:
        raise UsageError(f"group {', '.join(clash)} cannot be an op of torch.ops.{namespace}: "
                         "the name is an attribute of torch's op namespaces")


def schema(info: GroupInfo) -> str:
    """The torch schema of a group: `g(Tensor x, float p, *, SymInt seed, SymInt offset=0) ->
    Tensor` (SymInt: torch.compile passes a changing seed without recompiling)."""
    args = [f"Tensor {n}" if k == "tensor" else f"{_SCHEMA_TYPES[dt.lookup(d).kind]} {n}"
            for n, k, d in info.params]
    if info.has_random:
        args += ["*", "SymInt seed", "SymInt offset=0"]
    returns = "Tensor" if len(info.outputs) == 1 else \
        f"({', '.join('Tensor' for _ in info.outputs)})"
    return f"{info.name}({', '.join(args)}) -> {returns}"


def _detaching(impl):
    """`impl` on detached tensors: below autograd, inputs still say requires_grad, and DLPack
    (the CUDA path) refuses to export such tensors."""
    def run(*args, **random):
        return impl(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args), **random)
    return run


def _fake(bundle, info: GroupInfo):
    """The fake (meta) kernel of an op: shapes by broadcasting the (chunked) inputs, cat and row
    outputs as the runtime allocates them, dtypes from the typed IR; SymInt shapes welcome."""
    tensor_pos = [i for i, (_, k, _) in enumerate(info.params) if k == "tensor"]
    rows = info.row_outputs or (False,) * len(info.outputs)
    dtypes = _output_dtypes(bundle, info)

    def fake(*args, **_random):
        tensors = [args[i] for i in tensor_pos]
        shapes = []
        for t, chunk in zip(tensors, info.chunks):
            shape = list(t.shape)
            if chunk:
                shape[chunk[1]] = shape[chunk[1]] // chunk[0]
            shapes.append(shape)
        full = list(torch.broadcast_shapes(*shapes))
        outs = []
        for (_, cat), row, d in zip(info.outputs, rows,
                                    dtypes(tuple(t.dtype for t in tensors))):
            shape = list(full)
            if row:
                shape[-1:] = [1]
            elif cat:
                shape[cat[1]] = shape[cat[1]] * cat[0]
            outs.append(torch.empty(shape, dtype=d, device=tensors[0].device))
        return outs[0] if len(outs) == 1 else tuple(outs)
    return fake


def _output_dtypes(bundle, info: GroupInfo):
    """torch input dtypes -> torch output dtypes by the group's typed IR, memoized."""
    from .. import ir
    group = bundle.group_ir(info.name)
    memo: dict[tuple, tuple] = {}

    def dtypes(torch_dtypes: tuple) -> tuple:
        found = memo.get(torch_dtypes)
        if found is None:
            names = [str(d).removeprefix("torch.") for d in torch_dtypes]
            bad = [n for n in names if n not in dt.BY_NAME]
            if bad:
                raise ArgumentError(f"{info.name} has no kernels for torch dtype "
                                    f"{', '.join(bad)}; supported: "
                                    f"{', '.join(d.name for d in dt.ALL)}")
            try:
                kernel = ir.instantiate(group, {i.name: dt.lookup(n)
                                                for i, n in zip(group.tensor_inputs, names)})
            except SpecError as e:
                raise KernelNotFound(f"{info.name} does not type-check for dtypes "
                                     f"{', '.join(names)}, so no kernel serves them: {e}") from None
            found = memo[torch_dtypes] = tuple(getattr(torch, o.dtype.name)
                                               for o in kernel.outputs)
        return found
    return dtypes


def _register_autograd(lib, namespace: str, info: GroupInfo, grad: GroupInfo) -> None:
    """Autograd of op `info.name` by its backward op: only the inputs are saved (and seed,
    offset); gradients come back reduced to each input's shape and dtype."""
    backward_op = getattr(getattr(torch.ops, namespace), grad.name)
    n_in = len(info.params)
    out_names = [n for n, _ in info.outputs]
    grad_outs = [out_names.index(n[len("grad_"):]) for n, _, _ in grad.params[n_in:]]
    names = [n for n, _, _ in info.params]
    returned = [o for o, _ in grad.outputs]
    # each listed input: ('out', index into the backward op's outputs) or ('in', index into
    # the incoming gradients) when its gradient is one of those (grad_alias)
    where = {names.index(o[len("grad_"):]): ("out", k) for k, o in enumerate(returned)}
    for inp, src in grad.grad_alias:
        where[names.index(inp)] = ("out", returned.index(src)) if src in returned else \
            ("in", out_names.index(src[len("grad_"):]))
    listed = sorted(where)
    tensor_pos = [i for i, (_, k, _) in enumerate(info.params) if k == "tensor"]

    def setup_context(ctx, inputs, output, keyword_only_inputs=None):
        ctx.save_for_backward(*(inputs[i] for i in tensor_pos))
        ctx.inputs = [None if i in tensor_pos else a for i, a in enumerate(inputs)]
        ctx.random = keyword_only_inputs or {}

    def backward(ctx, *grads):
        result = [None] * n_in
        if not any(ctx.needs_input_grad[i] for i in listed):
            return tuple(result)
        inputs = list(ctx.inputs)
        for i, t in zip(tensor_pos, ctx.saved_tensors):
            inputs[i] = t
        got = backward_op(*inputs, *(grads[o].contiguous() for o in grad_outs), **ctx.random)
        got = got if isinstance(got, tuple) else (got,)
        for i in listed:
            if ctx.needs_input_grad[i]:
                kind, k = where[i]
                g = got[k] if kind == "out" else grads[k]
                result[i] = g.sum_to_size(inputs[i].shape).to(inputs[i].dtype)
        return tuple(result)

    torch.library.register_autograd(f"{namespace}::{info.name}", backward,
                                    setup_context=setup_context, lib=lib)


def _refuse_double_backward(lib, namespace: str, grad: GroupInfo) -> None:
    """A backward op's autograd: its own derivative is refused, naming the op."""
    op = f"torch.ops.{namespace}.{grad.name}"

    def setup_context(ctx, inputs, output, keyword_only_inputs=None):
        pass

    def backward(ctx, *grads):
        raise UsageError(f"{op} is a backward op and has no derivative: fusebuild bundles hold "
                         "first derivatives only (double backward, a grad of a grad taken with "
                         "create_graph=True, is not supported)")

    torch.library.register_autograd(f"{namespace}::{grad.name}", backward,
                                    setup_context=setup_context, lib=lib)
