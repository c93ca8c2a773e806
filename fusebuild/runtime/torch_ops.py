"""A bundle's groups as torch custom ops (DESIGN §9): `Bundle.torch_library(namespace)`.

Every group `g` becomes `torch.ops.<namespace>.g`, served by the bundle's kernels on CPU and
CUDA tensors, with a fake (meta) implementation that derives output shapes and dtypes from the
group's IR and runs the runtime's own argument checks. A group whose backward group `g__grad`
is in the bundle gets an autograd formula that saves only the inputs and calls
`torch.ops.<namespace>.g__grad`; the backward ops refuse a second derivative, and a gradient the
bundle has no backward for (a group without `grad:`, an input it does not list) is refused at
backward, naming the spec line to add. Imported (and torch with it) only by
`Bundle.torch_library`.
"""
from __future__ import annotations

from operator import itemgetter

import torch

from .. import dtypes as dt
from ..errors import ArgumentError, GradientError, KernelNotFound, SpecError, UsageError
from ..text import plural
from . import dispatch
from ..abi import GRAD_SUFFIX
from .dispatch import GroupInfo

_SCHEMA_TYPES = {"f": "float", "i": "int", "u": "int", "b": "bool"}
_LIBRARIES: dict[str, "TorchOps"] = {}      # namespace -> the ops registered there
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_WORD = 1 << 64


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
    cpu_impls = {}
    for name, info in infos.items():
        lib.define(schema(info))
        caller = bundle[name]     # the C fast path itself, seed= and offset= included
        cpu_impls[name] = _seed_words(caller) if info.has_random else caller
        lib.impl(name, cpu_impls[name], "CPU")
        cuda = _detaching(caller)
        lib.impl(name, _seed_words(cuda) if info.has_random else cuda, "CUDA")
        torch.library.register_fake(f"{namespace}::{name}", _fake(bundle, info), lib=lib)
    backward = tuple(n for n in infos if n + GRAD_SUFFIX in infos)
    for name in infos:
        if name.endswith(GRAD_SUFFIX) and name[:-len(GRAD_SUFFIX)] in infos:
            _refuse_double_backward(lib, namespace, infos[name], cpu_impls[name])
        else:
            _register_autograd(lib, namespace, bundle, infos[name], infos.get(name + GRAD_SUFFIX),
                               cpu_impls[name])
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
    Tensor` (SymInt: torch.compile passes a changing seed without recompiling; an int64, so a
    seed or offset >= 2**63 is passed as its two's complement, see `_seed_words`)."""
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


def _seed_words(impl):
    """`impl` taking a torch op's int64 seed and offset: a negative value is the two's
    complement of a uint64 word >= 2**63 (the schema holds no larger int), so every seed of
    [0, 2**64) reaches the kernels."""
    def run(*args, seed, offset=0):
        return impl(*args, seed=seed % _WORD, offset=offset % _WORD)
    return run


def _fake(bundle, info: GroupInfo):
    """The fake (meta) kernel of an op: the runtime's own argument checks (`dispatch.check`:
    the errors of a real call) give the output shapes, the typed IR the dtypes; SymInt shapes
    welcome."""
    dtypes = _output_dtypes(bundle, info)

    def fake(*args, **_random):
        device = _device(info, args)
        call = dispatch.check(info, tuple(0 if isinstance(a, _SYMBOLIC) else a for a in args),
                              _describe)
        outs = [torch.empty(shape, dtype=d, device=device)
                for shape, d in zip(call.out_shapes, dtypes(tuple(call.dtypes)))]
        return outs[0] if len(outs) == 1 else tuple(outs)
    return fake


def _device(info: GroupInfo, args: tuple) -> torch.device:
    """The device of an op's tensor inputs; ArgumentError when they are on several, as torch's
    own ops refuse (the dispatcher would run the fake kernel on a mix of CPU and meta)."""
    devices = {n: a.device for (n, k, _), a in zip(info.params, args) if k == "tensor"}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ArgumentError(f"{info.name}: tensor inputs are on different devices ({where}); "
                            "pass them all on one device")
    return next(iter(devices.values()))


def _describe(t: torch.Tensor) -> tuple:
    """(shape, byte strides, dtype) of a tensor for `dispatch.check`: the numpy dtype of a
    torch dtype fusebuild has, else the torch dtype's name (which check reports unsupported)."""
    name = str(t.dtype).removeprefix("torch.")
    d = dt.BY_NAME.get(name)
    size = t.element_size()
    return tuple(t.shape), tuple(s * size for s in t.stride()), d.numpy if d else name


def _output_dtypes(bundle, info: GroupInfo):
    """Input dtypes -> torch output dtypes, memoized: from the checked description of a kernel
    of those dtypes (`Bundle.typed_outputs`); for dtypes the bundle has no kernel of, by the
    group's typed IR (imported only then), whose error says why none can serve them."""
    memo: dict[tuple, tuple] = {}

    def dtypes(inputs: tuple[dt.DType, ...]) -> tuple:
        found = memo.get(inputs)
        if found is None:
            typed = bundle.typed_outputs(info.name, inputs) or _typed_by_ir(bundle, info, inputs)
            found = memo[inputs] = tuple(getattr(torch, d.name) for d in typed)
        return found
    return dtypes


def _typed_by_ir(bundle, info: GroupInfo, inputs: tuple[dt.DType, ...]) -> tuple:
    """The output dtypes of group `info` for `inputs` by its typed IR."""
    from .. import ir
    group = bundle.group_ir(info.name)
    try:
        kernel = ir.instantiate(group, dict(zip((i.name for i in group.tensor_inputs), inputs)))
    except SpecError as e:
        names = ", ".join(d.name for d in inputs)
        raise KernelNotFound(f"{info.name} does not type-check for dtypes {names}, so no "
                             f"kernel serves them: {e}") from None
    return tuple(o.dtype for o in kernel.outputs)


def _register_autograd(lib, namespace: str, bundle, info: GroupInfo,
                       grad: GroupInfo | None, impl) -> None:
    """Autograd of op `info.name` by its backward op `grad` (None: the group has none): only
    the inputs are saved (and seed, offset); gradients come back reduced to each input's shape
    and dtype. A gradient asked for an input the backward does not give is a GradientError,
    unless no output depends on the input through differentiable ops (its gradient is None,
    as in torch)."""
    names = [n for n, _, _ in info.params]
    tensor_pos = tuple(i for i, (_, k, _) in enumerate(info.params) if k == "tensor")
    scalar_pos = tuple(i for i, (_, k, _) in enumerate(info.params) if k != "tensor")
    where, grad_outs, backward_op = _gradient_sources(namespace, info, grad)
    listed = sorted(where)
    unlisted = [i for i in tensor_pos if i not in where]
    zero: dict[str, bool] = {}      # unlisted input -> whether its gradient is zero

    def zero_gradient(name: str) -> bool:
        if name not in zero:
            from .. import autodiff
            try:
                zero[name] = not autodiff.differentiable(bundle.group_ir(info.name), name)
            except SpecError:       # an op without derivative: listing it says where
                zero[name] = False
        return zero[name]

    tensors, scalars = _picker(tensor_pos), _picker(scalar_pos)

    def save(ctx, args: tuple, random: dict) -> None:
        ctx.save_for_backward(*tensors(args))
        ctx.scalars = scalars(args)
        ctx.random = random

    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[2:]      # past the keyset and the random words
        missing = [names[i] for i in unlisted if needs[i] and not zero_gradient(names[i])]
        if missing:
            raise _no_gradient(info, missing, [names[i] for i in listed])
        result = [None] * (len(names) + 2)
        if not any(needs[i] for i in listed):
            return tuple(result)
        inputs = [None] * len(names)
        for i, t in zip(tensor_pos, ctx.saved_tensors):
            inputs[i] = t
        for i, a in zip(scalar_pos, ctx.scalars):
            inputs[i] = a
        got = backward_op(*inputs, *(grads[o].contiguous() for o in grad_outs), **ctx.random)
        got = got if isinstance(got, tuple) else (got,)
        for i in listed:
            if needs[i]:
                kind, k = where[i]
                result[i + 2] = _as_input(got[k] if kind == "out" else grads[k], inputs[i])
        return tuple(result)

    _autograd_kernel(lib, namespace, info.name, impl, save, backward)


def _picker(positions: tuple[int, ...]):
    """args -> (args[i] for i in positions) as a tuple, picked in C where it can be."""
    if len(positions) > 1:
        return itemgetter(*positions)
    if positions:
        pick = itemgetter(positions[0])
        return lambda args: (pick(args),)
    return lambda args: ()


def _as_input(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient `g` at the shape and dtype of input `x` (a no-op when it already is)."""
    if g.shape != x.shape:
        g = g.sum_to_size(x.shape)
    return g if g.dtype == x.dtype else g.to(x.dtype)


def _autograd_kernel(lib, namespace: str, name: str, impl, save, backward) -> None:
    """Register op `name`'s Autograd kernel: `torch.library.register_autograd` less the Python
    work a plain call does not need. A call on plain CPU tensors (no mode, no subclass, no
    tracing: the dispatch key set below autograd is just CPU) runs the bundle's kernel `impl`
    directly, recorded by an autograd.Function when an input requires grad; any other call
    redispatches below autograd as torch's own kernel does. `save(ctx, args, random)` keeps
    what `backward(ctx, *grads)` needs; backward returns gradients for (keyset, random, *args)."""
    op = getattr(getattr(torch.ops, namespace), name).default
    after = torch._C._after_autograd_keyset
    keys = torch._C.DispatchKey
    cpu = torch._C.DispatchKeySet(keys.CPU)
    plain, plain_below = cpu.add(keys.AutogradCPU).raw_repr(), cpu.raw_repr()
    below = torch._C._AutoDispatchBelowAutograd
    grad_mode, wants_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad

    def forward(ctx, keyset, random, *args):
        if keyset.raw_repr() == plain_below:
            out = impl(*args, **random)
        else:
            with below():
                out = op.redispatch(keyset, *args, **random)
        save(ctx, args, random)
        return out

    recorded = type(f"Backward_{namespace}_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    apply = recorded.apply
    plain_apply = super(torch.autograd.Function, recorded).apply   # less the functorch checks
    transforms = torch._C._are_functorch_transforms_active

    def kernel(keyset, *args, **random):
        if grad_mode() and wants_grad(*args):
            if keyset.raw_repr() == plain and not transforms():
                return plain_apply(keyset & after, random, *args)
            return apply(keyset & after, random, *args)
        if keyset.raw_repr() == plain:
            return impl(*args, **random)
        with below():
            return op.redispatch(keyset & after, *args, **random)

    lib.impl(name, kernel, "Autograd", with_keyset=True)


def _gradient_sources(namespace: str, info: GroupInfo, grad: GroupInfo | None):
    """(where, grad_outs, backward op) of a forward op: where[i] is ('out', index into the
    backward op's outputs) or ('in', index into the incoming gradients, when its gradient is
    one of those: grad_alias) for each input `grad:` lists; grad_outs the forward outputs whose
    gradients the backward op takes, in its order. ({}, [], None) without a backward group."""
    if grad is None:
        return {}, [], None
    n_in = len(info.params)
    out_names = [n for n, _ in info.outputs]
    names = [n for n, _, _ in info.params]
    returned = [o for o, _ in grad.outputs]
    where = {names.index(o[len("grad_"):]): ("out", k) for k, o in enumerate(returned)}
    for inp, src in grad.grad_alias:
        where[names.index(inp)] = ("out", returned.index(src)) if src in returned else \
            ("in", out_names.index(src[len("grad_"):]))
    grad_outs = [out_names.index(n[len("grad_"):]) for n, _, _ in grad.params[n_in:]]
    return where, grad_outs, getattr(getattr(torch.ops, namespace), grad.name).default


def _no_gradient(info: GroupInfo, missing: list[str], listed: list[str]) -> GradientError:
    """The error for gradients of `missing` inputs that group `info` has no backward for."""
    which = ", ".join(f"'{n}'" for n in missing)
    wants = f"input{'s' if len(missing) > 1 else ''} {which} of {info.name} " \
            f"require{'' if len(missing) > 1 else 's'} grad"
    line = f"grad: [{', '.join(listed + missing)}]"
    if listed:
        why = f"its spec's `grad: [{', '.join(listed)}]` does not list {which}"
        fix = f"make it `{line}` in group '{info.name}'"
    else:
        why = f"group '{info.name}' has no `grad:`, so the bundle holds no backward for it"
        fix = f"add `{line}` to group '{info.name}' of the spec"
    detach = ", ".join(f"{n}.detach()" for n in missing)
    return GradientError(f"{wants}, but {why}: {fix} and rebuild the bundle (or pass {detach} "
                         "if no gradient is wanted)")


def _refuse_double_backward(lib, namespace: str, grad: GroupInfo, impl) -> None:
    """A backward op's autograd: its own derivative is refused, naming the op."""
    op = f"torch.ops.{namespace}.{grad.name}"

    def backward(ctx, *grads):
        raise UsageError(f"{op} is a backward op and has no derivative: fusebuild bundles hold "
                         "first derivatives only (double backward, a grad of a grad taken with "
                         "create_graph=True, is not supported)")

    _autograd_kernel(lib, namespace, grad.name, impl, lambda ctx, args, random: None, backward)
