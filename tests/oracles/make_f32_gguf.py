#!/usr/bin/env python3
"""Writes an F32 copy of a GGUF model with gguf-py: every tensor dequantized by gguf's numpy code,
all metadata copied. llama.cpp running this file computes the same function fedtune computes
on the quantized file (fedtune dequantizes to f32 and multiplies in f32), without llama.cpp's
activation quantization, so it is the fp32 oracle for logits.
Usage: make_f32_gguf.py IN.gguf OUT.gguf"""
import sys
import numpy as np
import gguf
from gguf.quants import dequantize

def main(src, dst):
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch=arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        vals = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape)]  # gguf-py wants outermost-first
        w.add_tensor(t.name, vals.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
