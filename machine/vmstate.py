"""Declarative device state, QEMU's VMState idea: one field list encodes, decodes and describes.

A device lists its fields once. The same list gives the bytes of its FULL section, reads them
back (for any version from the device's minimum up to its own), and produces the vmdesc JSON
entry that QEMU appends to every stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field as dc_field

# type name -> (struct code, size); "buffer"/"unused_buffer" take their size from the field.
_SCALARS = {
    "int64": (">q", 8),
    "uint64": (">Q", 8),
    "int32": (">i", 4),
    "uint32": (">I", 4),
    "uint16": (">H", 2),
    "uint8": (">B", 1),
    "bool": (">B", 1),
}


class VMStateError(Exception):
    pass


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    size: int = 0  # bytes of one element; implied for scalars
    array_len: int | None = None
    version_id: int = 0  # first version of the device that carries this field (QEMU's _V)
    default: object = 0

    def __post_init__(self):
        if self.type in _SCALARS:
            object.__setattr__(self, "size", _SCALARS[self.type][1])
        elif self.type not in ("buffer", "unused_buffer"):
            raise ValueError(f"unknown vmstate type {self.type}")
        if self.type == "bool":
            object.__setattr__(self, "default", bool(self.default))
        if self.type in ("buffer", "unused_buffer") and self.default == 0:
            object.__setattr__(self, "default", bytes(self.size))

    @property
    def wire_size(self) -> int:
        return self.size * (self.array_len or 1)


@dataclass(frozen=True)
class VMStateDescription:
    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple
    _structs: dict = dc_field(default_factory=dict, compare=False, repr=False)

    def fields_for(self, version_id: int):
        return [f for f in self.fields if f.version_id <= version_id]

    def size(self, version_id: int) -> int:
        return sum(f.wire_size for f in self.fields_for(version_id))

    def defaults(self) -> dict:
        return {f.name: (list(f.default) if isinstance(f.default, list) else
                         [f.default] * f.array_len if f.array_len else f.default)
                for f in self.fields if f.type != "unused_buffer"}

    def _struct(self, version_id: int) -> struct.Struct:
        st = self._structs.get(version_id)
        if st is None:
            codes = []
            for f in self.fields_for(version_id):
                if f.type in _SCALARS:
                    codes.append(_SCALARS[f.type][0][1:] * (f.array_len or 1))
                else:
                    codes.append(f"{f.wire_size}s")
            st = struct.Struct(">" + "".join(codes))
            self._structs[version_id] = st
        return st

    def encode(self, values: dict) -> bytes:
        """The payload at this description's own version."""
        flat = []
        for f in self.fields_for(self.version_id):
            if f.type == "unused_buffer":
                flat.append(bytes(f.wire_size))
                continue
            v = values[f.name]
            if f.array_len:
                if len(v) != f.array_len:
                    raise VMStateError(f"{self.name}.{f.name}: expected {f.array_len} elements")
                flat.extend(int(x) for x in v)
            elif f.type == "bool":
                flat.append(1 if v else 0)
            elif f.type == "buffer":
                flat.append(bytes(v))
            else:
                flat.append(int(v))
        return self._struct(self.version_id).pack(*flat)

    def decode(self, data: bytes, version_id: int) -> dict:
        """Field values from a payload written at ``version_id``; absent fields take defaults."""
        if not self.minimum_version_id <= version_id <= self.version_id:
            raise VMStateError(f"{self.name}: cannot decode version {version_id}")
        flat = list(self._struct(version_id).unpack(data))
        values = self.defaults()
        i = 0
        for f in self.fields_for(version_id):
            if f.array_len:
                values[f.name] = flat[i:i + f.array_len]
                i += f.array_len
                continue
            v = flat[i]
            i += 1
            if f.type == "unused_buffer":
                continue
            values[f.name] = bool(v) if f.type == "bool" else v
        return values

    def vmdesc(self, idstr: str, instance_id: int, version_id: int | None = None) -> dict:
        """The vmdesc entry QEMU writes for this device (at ``version_id``, default its own:
        the dissector asks for the version a stream carries)."""
        version_id = self.version_id if version_id is None else version_id
        out_fields = []
        for f in self.fields_for(version_id):
            d = {"name": f.name}
            if f.array_len:
                d["array_len"] = f.array_len
            d["type"] = f.type
            d["size"] = f.size
            out_fields.append(d)
        return {"name": idstr, "instance_id": instance_id, "vmsd_name": self.name,
                "version": version_id, "fields": out_fields}

    def describe_fields(self, data: bytes, version_id: int):
        """(field, value, offset, length) for each field of a payload: for the dissector."""
        out, off = [], 0
        values = self.decode(data, version_id)
        for f in self.fields_for(version_id):
            out.append((f, values.get(f.name), off, f.wire_size))
            off += f.wire_size
        return out
