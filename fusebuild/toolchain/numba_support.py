"""Memory-access and bit-cast intrinsics that generated numba source imports.

Kernels receive raw addresses as int64; these intrinsics turn them into typed loads and stores
(`ld_f32(addr, index)`, `st_f32(addr, index, value)`) and reinterpret bits (`f32_from_bits`).
Loads are marked as not aliasing stores: the runtime never passes overlapping inputs and outputs,
and this lets LLVM vectorize loops with many operands without run-time alias checks.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
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
    module = builder.module
    cached = getattr(module, "_fb_scopes", None)
    if cached is None:
        domain = module.add_metadata([ir.MetaDataString(module, "fusebuild")])
        loads = module.add_metadata([ir.MetaDataString(module, "fusebuild.loads"), domain])
        stores = module.add_metadata([ir.MetaDataString(module, "fusebuild.stores"), domain])
        cached = (module.add_metadata([loads]), module.add_metadata([stores]))
        module._fb_scopes = cached
    return cached


def _make_load(nb_type, ll_type):
    @intrinsic
    def load(typingctx, addr, index):
        def codegen(context, builder, sig, args):
            ptr = builder.gep(builder.inttoptr(args[0], ll_type.as_pointer()), [args[1]])
            inst = builder.load(ptr)
            loads, stores = _scopes(builder)
            inst.set_metadata("alias.scope", loads)
            inst.set_metadata("noalias", stores)
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


for _name, (_nb, _ll) in _STORAGE.items():
    globals()[f"ld_{_name}"] = _make_load(_nb, _ll)
    globals()[f"st_{_name}"] = _make_store(_nb, _ll)

f32_from_bits = _make_bitcast(types.uint32, types.float32)
bits_from_f32 = _make_bitcast(types.float32, types.uint32)
f64_from_bits = _make_bitcast(types.int64, types.float64)
bits_from_f64 = _make_bitcast(types.float64, types.uint64)

__all__ = [f"{op}_{n}" for n in _STORAGE for op in ("ld", "st")] + [
    "f32_from_bits", "bits_from_f32", "f64_from_bits", "bits_from_f64"]
