"""Load a Piper voice (.onnx + .onnx.json) into the torch VITS model.

Piper files are ONNX exports of a VITS generator. Most initializers keep their torch names, but
the exporter renames some (the text embedding may be stored as `sid`, shared conv weights as
`onnx::Conv_NNNN`) and folds others (`exp(-logs)` of the duration flow's affine layer). Every
lookup therefore falls back from the torch name to the graph node that consumes the tensor,
identified by its module path or by its sibling bias, and hyperparameters are read from tensor
shapes and node attributes instead of being assumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import VoiceFileError
from .vits import GeneratorConfig, VitsConfig, VitsSynthesizer

__all__ = ["VoiceFileError", "infer_config", "load_piper_onnx"]


@dataclass
class _Graph:
    tensors: dict[str, np.ndarray]
    # module path ("flow.flows.0.enc.in_layers.1") -> the node that applies it
    nodes_by_path: dict[str, onnx.NodeProto]
    # bias tensor name -> conv node using it (the weight's own name may have been lost)
    nodes_by_bias: dict[str, onnx.NodeProto]
    nodes_by_weight: dict[str, onnx.NodeProto]

    @classmethod
    def read(cls, path: Path) -> "_Graph":
        # A tensor's external data names a file to read; voices can be uploaded, and a Piper
        # voice keeps every weight inside its one file, so any such reference is refused.
        model = onnx.load(str(path), load_external_data=False)
        if external := [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]:
            raise VoiceFileError(f"{path}: tensors stored outside the file ({', '.join(external[:3])}); a Piper voice is one file")
        tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        by_path, by_bias, by_weight = {}, {}, {}
        for node in model.graph.node:
            module_path = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            if node.op_type in ("Conv", "ConvTranspose", "Gather"):
                by_path.setdefault(module_path, node)
            if node.op_type in ("Conv", "ConvTranspose"):
                by_weight[node.input[1]] = node
                if len(node.input) > 2:
                    by_bias[node.input[2]] = node
        return cls(tensors, by_path, by_bias, by_weight)

    def weight_node(self, module: str) -> onnx.NodeProto | None:
        return (
            self.nodes_by_weight.get(f"{module}.weight")
            or self.nodes_by_bias.get(f"{module}.bias")
            or self.nodes_by_path.get(module)
        )

    def get(self, name: str) -> np.ndarray | None:
        if name in self.tensors:
            return self.tensors[name]
        if name.endswith(".weight"):
            node = self.weight_node(name[: -len(".weight")])
            if node is not None:
                data_input = node.input[0] if node.op_type == "Gather" else node.input[1]
                return self.tensors.get(data_input)
        if name == "dp.flows.0.logs":
            # Folded by the exporter into exp(-logs), the factor it multiplies by.
            folded = self.tensors.get("/dp/flows.0/Exp_output_0")
            if folded is not None:
                return -np.log(folded)
        return None

    def require(self, name: str) -> np.ndarray:
        value = self.get(name)
        if value is None:
            raise VoiceFileError(f"voice file has no tensor for {name!r}")
        return value

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def count(self, pattern: str) -> list[int]:
        """Sorted distinct integers N for which a tensor name matches pattern (with one (\\d+))."""
        regex = re.compile(pattern)
        found = {int(m.group(1)) for n in self.tensors if (m := regex.fullmatch(n))}
        found |= {int(m.group(1)) for n in self.nodes_by_path if (m := regex.fullmatch(n + ".weight"))}
        return sorted(found)

    def attribute(self, module: str, attr: str, default: list[int]) -> list[int]:
        node = self.weight_node(module)
        if node is None:
            return default
        for a in node.attribute:
            if a.name == attr:
                return list(onnx.helper.get_attribute_value(a))
        return default


def infer_config(graph: _Graph) -> VitsConfig:
    emb = graph.require("enc_p.emb.weight")
    n_vocab, hidden = emb.shape
    rel = graph.require("enc_p.encoder.attn_layers.0.emb_rel_k")
    ffn = graph.require("enc_p.encoder.ffn_layers.0.conv_1.weight")
    dp_couplings = graph.count(r"dp\.flows\.(\d+)\.pre\.weight")
    flows = graph.count(r"flow\.flows\.(\d+)\.pre\.weight")
    wn_layers = graph.count(r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.bias")
    ups = graph.count(r"dec\.ups\.(\d+)\.weight")
    resblocks = graph.count(r"dec\.resblocks\.(\d+)\..*bias")
    if not (dp_couplings and flows and wn_layers and ups and resblocks):
        raise VoiceFileError("voice file lacks the VITS duration predictor, flow or decoder tensors")
    kernels_per_up = len(resblocks) // len(ups)
    resblock_type = "1" if graph.has("dec.resblocks.0.convs1.0.weight") else "2"
    conv_name = "convs1" if resblock_type == "1" else "convs"

    resblock_kernels, resblock_dilations = [], []
    for j in range(kernels_per_up):
        layers = graph.count(rf"dec\.resblocks\.{j}\.{conv_name}\.(\d+)\.bias")
        resblock_kernels.append(int(graph.require(f"dec.resblocks.{j}.{conv_name}.0.weight").shape[2]))
        resblock_dilations.append(
            tuple(graph.attribute(f"dec.resblocks.{j}.{conv_name}.{i}", "dilations", [1])[0] for i in layers)
        )
    cond = graph.get("dec.cond.weight")
    gin = int(cond.shape[1]) if cond is not None else 0
    speakers = graph.get("emb_g.weight")
    wn_dilation = graph.attribute("flow.flows.0.enc.in_layers.1", "dilations", [1])[0] if len(wn_layers) > 1 else 1

    generator = GeneratorConfig(
        in_channels=int(graph.require("dec.conv_pre.weight").shape[1]),
        resblock=resblock_type,
        resblock_kernel_sizes=tuple(resblock_kernels),
        resblock_dilation_sizes=tuple(resblock_dilations),
        upsample_rates=tuple(graph.attribute(f"dec.ups.{i}", "strides", [1])[0] for i in ups),
        upsample_initial_channel=int(graph.require("dec.conv_pre.weight").shape[0]),
        upsample_kernel_sizes=tuple(int(graph.require(f"dec.ups.{i}.weight").shape[2]) for i in ups),
        gin_channels=gin,
    )
    return VitsConfig(
        n_vocab=int(n_vocab),
        inter_channels=int(graph.require("enc_p.proj.weight").shape[0]) // 2,
        hidden_channels=int(hidden),
        filter_channels=int(ffn.shape[0]),
        n_heads=int(hidden) // int(rel.shape[2]),
        n_layers=len(graph.count(r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.bias")),
        kernel_size=int(ffn.shape[2]),
        window=(int(rel.shape[1]) - 1) // 2,
        dp_kernel_size=int(graph.require("dp.convs.convs_sep.0.weight").shape[2]),
        dp_n_flows=max(dp_couplings) // 2 + 1,
        dp_num_bins=(int(graph.require(f"dp.flows.{dp_couplings[0]}.proj.weight").shape[0]) + 1) // 3,
        flow_kernel_size=int(graph.require("flow.flows.0.enc.in_layers.0.weight").shape[2]),
        flow_dilation_rate=int(wn_dilation),
        flow_n_layers=len(wn_layers),
        flow_n_flows=len(flows),
        generator=generator,
        n_speakers=int(speakers.shape[0]) if speakers is not None else 1,
        gin_channels=gin,
    )


def load_piper_onnx(path: str | Path) -> VitsSynthesizer:
    """Build a VitsSynthesizer with hyperparameters and weights read from a Piper .onnx file."""
    path = Path(path)
    try:
        graph = _Graph.read(path)
    except Exception as exc:  # onnx raises several unrelated types for unreadable files
        raise VoiceFileError(f"cannot read ONNX voice {path}: {exc}") from exc
    try:
        model = VitsSynthesizer(infer_config(graph))
    except VoiceFileError:
        raise
    except (ValueError, IndexError, KeyError, ZeroDivisionError, RuntimeError) as exc:
        raise VoiceFileError(f"{path}: tensors do not form a VITS model: {exc}") from exc
    state = {}
    for name, param in model.state_dict().items():
        value = graph.require(name)
        if tuple(value.shape) != tuple(param.shape):
            raise VoiceFileError(f"{name}: file has shape {value.shape}, model expects {tuple(param.shape)}")
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32))
    model.load_state_dict(state)
    return model.eval()
