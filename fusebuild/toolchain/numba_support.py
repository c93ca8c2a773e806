"""Memory-access and bit-cast intrinsics that generated numba source imports.

Kernels receive raw addresses as int64; these intrinsics turn them into typed loads and stores
(`ld_f32(addr, index)`, `st_f32(addr, index, value)`; `ldb_f32` reads back what a kernel
stored in an output), prefetch hints (`pf_f32(addr, index)`) and
reinterpret bits (`f32_from_bits`).
Loads are marked as not aliasing stores: the runtime never passes overlapping inputs and outputs,
and this lets LLVM vectorize loops with many operands without run-time alias checks.
The exponent intrinsics of the math helpers (`f32_ldexp`, `f32_pow2`, `f32_exponent`,
`f32_significand`, `f64_pow2`) and the float16/bfloat16 conversions (`f16_value`, `f16_bits`,
`bf16_value`, `bf16_bits`) are written with 32-bit integer operations (numba would widen integer
arithmetic to 64 bits), so the loop vectorizer keeps them in 32-bit lanes on every ISA level;
`muladd` lets polynomials use FMA where the ISA has it, and `select` keeps `where` branch-free.
Row reductions accumulate with `acc_add` (`fadd reassoc`: only these additions may be reordered,
so LLVM's loop vectorizer keeps SIMD partial sums while the compensated math helpers stay exact),
`acc_max`/`acc_min` (`llvm.maximum`/`llvm.minimum`: NaN-propagating, reduced by the vectorizer)
and combine block sums pairwise on a small stack (`cascade_stack`, `cascade_push`, `cascade_total`).
A row's costly values can be kept for the next sweep in a `row_scratch` buffer.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

_STORAGE = {
    "f32": (types.float32, ir.FloatType()),
    "f64": (types.float64, ir.DoubleType()),
    "i8": (types.int8, ir.IntType(8)),
    "i16": (types.int16, ir.IntType(16)),
    "i32": (types.int32, ir.IntType(32)),
    "i64": (types.int64, ir.IntType(64)),
    "u8": (types.uint8, ir.IntType(8)),
    "u16": (types.uint16, ir.IntType(16)),
}


def _scopes(builder):
    """The alias scopes of a function: one for kernel inputs, one for outputs."""
    return _all_scopes(builder)[:2]


def _all_scopes(builder):
    """Scope lists of kernel inputs, outputs and row scratch, and the list of the first two
    (what scratch accesses never alias)."""
    module = builder.module
    cached = getattr(module, "_fb_scopes", None)
    if cached is None:
        domain = module.add_metadata([ir.MetaDataString(module, "fusebuild")])
        loads = module.add_metadata([ir.MetaDataString(module, "fusebuild.loads"), domain])
        stores = module.add_metadata([ir.MetaDataString(module, "fusebuild.stores"), domain])
        scratch = module.add_metadata([ir.MetaDataString(module, "fusebuild.scratch"), domain])
        cached = (module.add_metadata([loads]), module.add_metadata([stores]),
                  module.add_metadata([scratch]), module.add_metadata([loads, stores]))
        module._fb_scopes = cached
    return cached


def _make_load(nb_type, ll_type, back: bool = False):
    """A load of a kernel input; `back`: of a value the kernel stored in an output (it may
    alias the stores, never the inputs)."""
    @intrinsic
    def load(typingctx, addr, index):
        def codegen(context, builder, sig, args):
            ptr = builder.gep(builder.inttoptr(args[0], ll_type.as_pointer()), [args[1]])
            inst = builder.load(ptr)
            loads, stores = _scopes(builder)
            inst.set_metadata("alias.scope", stores if back else loads)
            inst.set_metadata("noalias", loads if back else stores)
            return inst
        return nb_type(types.int64, types.int64), codegen
    return load


def _make_store(nb_type, ll_type):
    @intrinsic
    def store(typingctx, addr, index, value):
        def codegen(context, builder, sig, args):
            ptr = builder.gep(builder.inttoptr(args[0], ll_type.as_pointer()), [args[1]])
            value = context.cast(builder, args[2], sig.args[2], nb_type)
            inst = builder.store(value, ptr)
            loads, stores = _scopes(builder)
            inst.set_metadata("alias.scope", stores)
            inst.set_metadata("noalias", loads)
            return context.get_dummy_value()
        return types.void(types.int64, types.int64, value), codegen
    return store


def _make_bitcast(src, dst):
    @intrinsic
    def bitcast(typingctx, x):
        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], src)
            return builder.bitcast(value, context.get_value_type(dst))
        return dst(x), codegen
    return bitcast


_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _f32_bits(builder, context, value, nb_type):
    return builder.bitcast(context.cast(builder, value, nb_type, types.float32), _I32)


def _i32(v: int) -> ir.Constant:
    return ir.Constant(_I32, v)


def _pow2_f32(builder, n):
    """2**n as float32 for an i32 n in [-126, 127]."""
    return builder.bitcast(builder.shl(builder.add(n, _i32(127)), _i32(23)), ir.FloatType())


@intrinsic
def f32_ldexp(typingctx, x, k):
    """x * 2**k for an integer-valued float32 k in [-252, 254], as two exact power-of-two factors:
    a result that underflows is rounded once, one that overflows becomes inf."""
    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], types.float32)
        n = builder.fptosi(context.cast(builder, args[1], sig.args[1], types.float32), _I32)
        half = builder.ashr(n, _i32(1))
        y = builder.fmul(x, _pow2_f32(builder, half))
        return builder.fmul(y, _pow2_f32(builder, builder.sub(n, half)))
    return types.float32(x, k), codegen


@intrinsic
def f32_pow2(typingctx, k):
    """2**k for an integer-valued float32 k in [-126, 127] (exponent field assembly)."""
    def codegen(context, builder, sig, args):
        n = builder.fptosi(context.cast(builder, args[0], sig.args[0], types.float32), _I32)
        return _pow2_f32(builder, n)
    return types.float32(k), codegen


@intrinsic
def f32_exponent(typingctx, x):
    """The biased exponent field of float32 x (0..255), as a float32."""
    def codegen(context, builder, sig, args):
        bits = _f32_bits(builder, context, args[0], sig.args[0])
        field = builder.and_(builder.lshr(bits, _i32(23)), _i32(255))
        return builder.sitofp(field, ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def f32_significand(typingctx, x):
    """float32 x with its sign cleared and its exponent set to 0: in [1, 2) for normal x."""
    def codegen(context, builder, sig, args):
        bits = _f32_bits(builder, context, args[0], sig.args[0])
        mant = builder.or_(builder.and_(bits, _i32(0x007FFFFF)), _i32(0x3F800000))
        return builder.bitcast(mant, ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def f64_pow2(typingctx, k):
    """2**k for an integer-valued float64 k in [-1022, 1023]; the integer is taken from the low
    bits of k + 1.5 * 2**52, so no float-to-int64 conversion is needed (none before AVX-512)."""
    def codegen(context, builder, sig, args):
        k = context.cast(builder, args[0], sig.args[0], types.float64)
        shifted = builder.fadd(k, ir.Constant(ir.DoubleType(), 6755399441055744.0 + 1023.0))
        biased = builder.shl(builder.bitcast(shifted, _I64), ir.Constant(_I64, 52))
        return builder.bitcast(biased, ir.DoubleType())
    return types.float64(k), codegen


@intrinsic
def muladd(typingctx, a, b, c):
    """a * b + c, fused where the ISA has FMA (llvm.fmuladd); for polynomial evaluation."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        ftype = context.get_value_type(sig.return_type)
        fn = builder.module.declare_intrinsic("llvm.fmuladd", [ftype],
                                             ir.FunctionType(ftype, [ftype] * 3))
        return builder.call(fn, args)
    return a(a, b, c), codegen


@intrinsic
def select(typingctx, cond, a, b):
    """`a if cond else b` as one LLVM select: no branch for LLVM to sink an operand's load into
    (the loop vectorizer would then need masked or scalarized loads)."""
    t = typingctx.unify_types(a, b)
    if t is None:
        return None

    def codegen(context, builder, sig, args):
        c = context.cast(builder, args[0], sig.args[0], types.boolean)
        return builder.select(c, context.cast(builder, args[1], sig.args[1], t),
                              context.cast(builder, args[2], sig.args[2], t))
    return t(cond, a, b), codegen


@intrinsic
def acc_add(typingctx, acc, x):
    """acc + x for a reduction's accumulator: floats with `reassoc`, the one freedom the loop
    vectorizer needs to keep partial sums in SIMD lanes (integers: a plain add)."""
    if acc != x or not isinstance(acc, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        if isinstance(sig.return_type, types.Float):
            return builder.fadd(args[0], args[1], flags=("reassoc",))
        return builder.add(args[0], args[1])
    return acc(acc, x), codegen


def _make_extremum(name: str, signed: str, unsigned: str):
    @intrinsic
    def extremum(typingctx, acc, x):
        if acc != x or not isinstance(acc, (types.Float, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            t = sig.return_type
            if isinstance(t, types.Float):     # NaN-propagating, -0 < +0 (torch.amax/amin)
                ftype = context.get_value_type(t)
                fn = builder.module.declare_intrinsic(f"llvm.{name}", [ftype],
                                                      ir.FunctionType(ftype, [ftype] * 2))
                return builder.call(fn, args)
            op = signed if t.signed else unsigned
            return builder.select(builder.icmp_signed(op, args[0], args[1]) if t.signed else
                                  builder.icmp_unsigned(op, args[0], args[1]), args[0], args[1])
        return acc(acc, x), codegen
    return extremum


acc_max = _make_extremum("maximum", ">", ">")
acc_min = _make_extremum("minimum", "<", "<")

CASCADE_DEPTH = 64     # block sums of up to 2**64 blocks


def _entry_alloca(builder, ty):
    """The address of an uninitialized `ty` on the stack, allocated once in the entry block
    (numba's cgutils.alloca_once zero-fills it: a memset per call)."""
    with builder.goto_entry_block():
        ptr = builder.alloca(ty)
    return builder.ptrtoint(ptr, _I64)


def _make_entry_buffer(count: int):
    """An intrinsic giving the address of `count` uninitialized values of its argument's float
    type, allocated once in the kernel's entry block."""
    @intrinsic
    def buffer(typingctx, zero):
        if not isinstance(zero, types.Float):
            return None

        def codegen(context, builder, sig, args):
            return _entry_alloca(builder, ir.ArrayType(args[0].type, count))
        return types.int64(zero), codegen
    return buffer


def _make_buffer_access(nb_type, ll_type, scoped: bool):
    """Load and store of an entry buffer. Unannotated for a cascade stack (ld_*/st_* promise
    loads never alias stores); `scoped` (a row scratch buffer): they alias each other, never
    kernel operands."""
    def tag(builder, inst):
        if scoped:
            _, _, scratch, operands = _all_scopes(builder)
            inst.set_metadata("alias.scope", scratch)
            inst.set_metadata("noalias", operands)

    @intrinsic
    def load(typingctx, addr, index):
        def codegen(context, builder, sig, args):
            inst = builder.load(builder.gep(builder.inttoptr(args[0], ll_type.as_pointer()),
                                            [args[1]]))
            tag(builder, inst)
            return inst
        return nb_type(types.int64, types.int64), codegen

    @intrinsic
    def store(typingctx, addr, index, value):
        def codegen(context, builder, sig, args):
            ptr = builder.gep(builder.inttoptr(args[0], ll_type.as_pointer()), [args[1]])
            tag(builder, builder.store(context.cast(builder, args[2], sig.args[2], nb_type), ptr))
            return context.get_dummy_value()
        return types.void(types.int64, types.int64, value), codegen
    return load, store


# A per-call stack of CASCADE_DEPTH accumulators, for `cascade_push`/`cascade_total`.
cascade_stack = _make_entry_buffer(CASCADE_DEPTH)

SCRATCH = 8192     # elements of a row scratch buffer (`row_scratch`)
# A row's values computed in one sweep and read back in the next (`sc_st_*`, `sc_ld_*`) instead
# of being computed again.
row_scratch = _make_entry_buffer(SCRATCH)

sc_ld_f32, sc_st_f32 = _make_buffer_access(types.float32, ir.FloatType(), scoped=True)
sc_ld_f64, sc_st_f64 = _make_buffer_access(types.float64, ir.DoubleType(), scoped=True)
_stk_f32 = _make_buffer_access(types.float32, ir.FloatType(), scoped=False)
_stk_f64 = _make_buffer_access(types.float64, ir.DoubleType(), scoped=False)


def _make_cascade(ld, st):
    @njit(inline="always")
    def push(stack, count, s):
        # the count-th block sum (0-based): merge it with the stored sums of the blocks before
        # it like a binary counter, so every sum adds two sums of equally many blocks
        level = 0
        while count & 1:
            s = ld(stack, level) + s
            count >>= 1
            level += 1
        st(stack, level, s)

    @njit(inline="always")
    def total(stack, count, zero):
        # the sum of `count` pushed blocks: the stored sums, smallest first
        s = zero
        level = 0
        while count:
            if count & 1:
                s = s + ld(stack, level)
            count >>= 1
            level += 1
        return s
    return push, total


cascade_push_f32, cascade_total_f32 = _make_cascade(*_stk_f32)
cascade_push_f64, cascade_total_f64 = _make_cascade(*_stk_f64)


@intrinsic
def f16_value(typingctx, h):
    """float16 bits (uint16) -> float32, exact for every value (subnormals, inf, NaN payload)."""
    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        h32 = builder.zext(context.cast(builder, args[0], sig.args[0], types.uint16), _I32)
        a = builder.and_(h32, _i32(0x7FFF))
        wide = builder.shl(a, _i32(13))
        normal = builder.add(wide, _i32(112 << 23))
        special = builder.or_(wide, _i32(0x7F800000))
        sub = builder.bitcast(builder.fmul(builder.sitofp(a, f32), ir.Constant(f32, 2.0 ** -24)),
                              _I32)
        r = builder.select(builder.icmp_unsigned(">=", a, _i32(0x7C00)), special, normal)
        r = builder.select(builder.icmp_unsigned("<", a, _i32(0x400)), sub, r)
        sign = builder.shl(builder.and_(h32, _i32(0x8000)), _i32(16))
        return builder.bitcast(builder.or_(r, sign), f32)
    return types.float32(h), codegen


@intrinsic
def bf16_value(typingctx, h):
    """bfloat16 bits (uint16) -> float32 (exact)."""
    def codegen(context, builder, sig, args):
        h32 = builder.zext(context.cast(builder, args[0], sig.args[0], types.uint16), _I32)
        return builder.bitcast(builder.shl(h32, _i32(16)), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def bf16_bits(typingctx, x):
    """float32 -> bfloat16 bits: round to nearest even; NaN stays NaN (quiet, sign and top
    payload bits kept)."""
    def codegen(context, builder, sig, args):
        bits = _f32_bits(builder, context, args[0], sig.args[0])
        lsb = builder.and_(builder.lshr(bits, _i32(16)), _i32(1))
        rounded = builder.lshr(builder.add(builder.add(bits, _i32(0x7FFF)), lsb), _i32(16))
        nan = builder.icmp_unsigned(">", builder.and_(bits, _i32(0x7FFFFFFF)), _i32(0x7F800000))
        quiet = builder.or_(builder.lshr(bits, _i32(16)), _i32(0x40))
        return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))
    return types.uint16(x), codegen


@intrinsic
def f16_bits(typingctx, x):
    """float32 -> float16 bits: round to nearest even (subnormals included), overflow to inf,
    NaN stays NaN (quiet, top payload bits kept)."""
    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        bits = _f32_bits(builder, context, args[0], sig.args[0])
        sign = builder.and_(builder.lshr(bits, _i32(16)), _i32(0x8000))
        a = builder.and_(bits, _i32(0x7FFFFFFF))
        normal = builder.icmp_unsigned(">=", a, _i32(0x38800000))
        # |x| < 2**-14: the float16 subnormal count is |x| * 2**24 rounded to nearest even
        tiny = builder.bitcast(builder.select(normal, _i32(0), a), f32)
        rint = builder.module.declare_intrinsic("llvm.rint", [f32])
        sub = builder.fptosi(builder.call(rint, [builder.fmul(tiny, ir.Constant(f32, 2.0 ** 24))]),
                             _I32)
        lsb = builder.and_(builder.lshr(a, _i32(13)), _i32(1))
        norm = builder.sub(builder.lshr(builder.add(builder.add(a, _i32(0xFFF)), lsb), _i32(13)),
                           _i32(112 << 10))
        r = builder.select(normal, norm, sub)
        r = builder.select(builder.icmp_unsigned(">=", a, _i32(0x477FF000)), _i32(0x7C00), r)
        nan = builder.or_(builder.and_(builder.lshr(a, _i32(13)), _i32(0x3FF)), _i32(0x7E00))
        r = builder.select(builder.icmp_unsigned(">", a, _i32(0x7F800000)), nan, r)
        return builder.trunc(builder.or_(r, sign), ir.IntType(16))
    return types.uint16(x), codegen


def _make_prefetch(ll_type):
    @intrinsic
    def prefetch(typingctx, addr, index):
        """Hint the cache line of element `index` of `addr` into the caches (a hint: never
        faults, even for an address past the end)."""
        def codegen(context, builder, sig, args):
            ptr = builder.gep(builder.inttoptr(args[0], ll_type.as_pointer()), [args[1]])
            i8p = ir.IntType(8).as_pointer()
            fn = builder.module.declare_intrinsic(
                "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p] + [_I32] * 3))
            builder.call(fn, [builder.bitcast(ptr, i8p), _i32(0), _i32(3), _i32(1)])
            return context.get_dummy_value()
        return types.void(types.int64, types.int64), codegen
    return prefetch


for _name, (_nb, _ll) in _STORAGE.items():
    globals()[f"ld_{_name}"] = _make_load(_nb, _ll)
    globals()[f"st_{_name}"] = _make_store(_nb, _ll)
    globals()[f"pf_{_name}"] = _make_prefetch(_ll)
ldb_f32 = _make_load(types.float32, ir.FloatType(), back=True)
ldb_f64 = _make_load(types.float64, ir.DoubleType(), back=True)

f32_from_bits = _make_bitcast(types.uint32, types.float32)
bits_from_f32 = _make_bitcast(types.float32, types.uint32)
f64_from_bits = _make_bitcast(types.int64, types.float64)
bits_from_f64 = _make_bitcast(types.float64, types.uint64)

__all__ = [f"{op}_{n}" for n in _STORAGE for op in ("ld", "st", "pf")] + [
    "f32_from_bits", "bits_from_f32", "f64_from_bits", "bits_from_f64", "f32_ldexp", "f32_pow2",
    "f32_exponent", "f32_significand", "f64_pow2", "muladd", "bf16_bits", "bf16_value",
    "f16_bits", "f16_value", "select", "acc_add", "acc_max", "acc_min", "cascade_stack",
    "cascade_push_f32", "cascade_total_f32", "cascade_push_f64", "cascade_total_f64",
    "SCRATCH", "row_scratch", "sc_ld_f32", "sc_st_f32", "sc_ld_f64", "sc_st_f64", "ldb_f32",
    "ldb_f64"]
