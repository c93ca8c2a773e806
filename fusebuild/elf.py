"""Minimal ELF64 reading: machine, flags, bounds, exported and undefined symbols, a data
symbol's bytes (for bundle checks)."""
from __future__ import annotations

import struct

EM_X86_64 = 62
EM_AARCH64 = 183
EM_CUDA = 190
_SHT_SYMTAB, _SHT_DYNSYM, _SHT_NOBITS = 2, 11, 8
_STT_OBJECT = 1


def header(data: bytes) -> tuple[int, int, int]:
    """(e_machine, EI_ABIVERSION, e_flags); ValueError if not a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (machine,) = struct.unpack_from("<H", data, 18)
    (flags,) = struct.unpack_from("<I", data, 48)
    return machine, data[8], flags


def check_bounds(data: bytes) -> None:
    """ValueError unless the program and section header tables, every segment's file image and
    every section's data lie within the file (a truncated file fails here)."""
    header(data)
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    tables = (("program header table", phoff, phentsize, phnum, 56),
              ("section header table", shoff, shentsize, shnum, 64))
    for what, offset, entsize, count, least in tables:
        if count and entsize < least:
            raise ValueError(f"its {what} has entries of {entsize} bytes, under {least}")
        if offset + entsize * count > len(data):
            raise ValueError(f"its {what} ends at byte {offset + entsize * count}, past the end "
                             f"of the file ({len(data)} bytes): truncated or malformed")
    for i in range(phnum):
        offset, _, _, filesz = struct.unpack_from("<QQQQ", data, phoff + i * phentsize + 8)
        if offset + filesz > len(data):
            raise ValueError(f"segment {i} ends at byte {offset + filesz}, past the end of the "
                             f"file ({len(data)} bytes): truncated or malformed")
    for i in range(shnum):
        _, sh_type, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        if sh_type != _SHT_NOBITS and offset + size > len(data):
            raise ValueError(f"section {i} ends at byte {offset + size}, past the end of the "
                             f"file ({len(data)} bytes): truncated or malformed")


def cubin_sm(data: bytes) -> int:
    """The SM a cubin is for: e_flags bits 8-15 from CUDA ELF ABI version 8 (CUDA 12.8) on,
    bits 0-7 before."""
    machine, abi, flags = header(data)
    if machine != EM_CUDA:
        raise ValueError(f"e_machine {machine} is not EM_CUDA")
    return (flags >> 8) & 0xFF if abi >= 8 else flags & 0xFF


def _sections(data: bytes) -> list[tuple]:
    """The section headers (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link,
    sh_info, sh_addralign, sh_entsize)."""
    header(data)
    (shoff,) = struct.unpack_from("<Q", data, 40)
    shentsize, shnum, _ = struct.unpack_from("<HHH", data, 58)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]


def _symbols(data: bytes, types: tuple[int, ...]):
    """(name, st_info, st_shndx, st_value, st_size) of every symbol in the symbol tables of
    `types`."""
    sections = _sections(data)
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type not in types or not entsize:
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ",
                                                                                   data, pos)
            start = strtab + st_name
            yield data[start:data.index(b"\0", start)].decode(), st_info, st_shndx, st_value, \
                st_size


def object_bytes(data: bytes, name: str) -> bytes | None:
    """The initial bytes of the defined data object `name` (any binding, either symbol table),
    read from its section in the file; None if there is no such object. ValueError if the
    symbol points outside the file."""
    sections = _sections(data)
    for sym, info, shndx, value, size in _symbols(data, (_SHT_SYMTAB, _SHT_DYNSYM)):
        if sym != name or info & 0xF != _STT_OBJECT or not 0 < shndx < len(sections):
            continue
        _, sh_type, _, addr, offset, sh_size, *_ = sections[shndx]
        start = value - addr
        if sh_type == _SHT_NOBITS or not 0 <= start <= start + size <= sh_size or \
                offset + start + size > len(data):
            raise ValueError(f"symbol {name} lies outside the data of its section")
        return data[offset + start:offset + start + size]
    return None


def functions(data: bytes) -> set[str]:
    """Names of defined global function symbols (static and dynamic symbol tables)."""
    return {name for name, info, shndx, _, _ in _symbols(data, (_SHT_SYMTAB, _SHT_DYNSYM))
            if info >> 4 == 1 and info & 0xF == 2 and shndx != 0}          # GLOBAL FUNC


def undefined(data: bytes) -> dict[str, bool]:
    """Undefined dynamic symbols of a shared object, each with whether it is weak."""
    return {name: info >> 4 == 2 for name, info, shndx, _, _ in _symbols(data, (_SHT_DYNSYM,))
            if shndx == 0 and name}
