"""Writes a GGUF file's weights at f32 (gst-tests/llama-cpp-check.sh).

    dequantize.py IN.gguf OUT.gguf

Every tensor is decoded with gguf-py's own dequantizer and stored as f32; the metadata is copied
as it is. llama.cpp on OUT is the reference for what the decoder computes on those trained
weights without quantized products, and its distance from llama.cpp on IN is what quantization
itself does (plugin/tests/gguf_llama_cpp.rs uses both).
"""

import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize


def field_value(field):
    """The value of a metadata field in the form GGUFWriter.add_key_value takes."""
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data], item
        return [field.parts[i].tolist()[0] for i in field.data], item
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8"), None
    return field.parts[-1].tolist()[0], None


def main():
    src, dst = sys.argv[1:3]
    reader = GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        # The header's own fields and the architecture are written by GGUFWriter itself.
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, item = field_value(field)
        writer.add_key_value(name, value, field.types[0], sub_type=item)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        writer.add_tensor(tensor.name, values.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"dequantize: {len(reader.tensors)} tensors of {src} at f32 in {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
