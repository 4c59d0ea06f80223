"""What the int8 ONNX exports of both towers must hold (onnxcache.quantize_int8)."""


def assert_weight_matmuls_int8_per_channel(graph) -> list[str]:
    """Every MatMul with a weight is an int8 MatMulInteger with one weight zero point per output column
    (only activation x activation products stay fp32). Returns the graph's op types."""
    ops = [node.op_type for node in graph.node]
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    fp32_weight_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & set(shapes)]
    assert fp32_weight_matmuls == [] and ops.count("MatMulInteger") >= 4
    for node in graph.node:
        if node.op_type == "MatMulInteger":  # inputs: A, B, A's zero point, B's zero point (one per column)
            assert shapes[node.input[3]] == shapes[node.input[1]][1:] and shapes[node.input[1]][1] > 1
    return ops


def int8_weight_peak(graph) -> int:
    """The largest |value| among the int8 weights of the graph's MatMulInteger nodes (127 when 8 bits are
    used, 64 at most with onnxruntime's reduce_range)."""
    import numpy as np
    from onnx import numpy_helper

    weights = {init.name: init for init in graph.initializer}
    peaks = [int(np.abs(numpy_helper.to_array(weights[n.input[1]]).astype(np.int16)).max())
             for n in graph.node if n.op_type == "MatMulInteger"]
    return max(peaks)
