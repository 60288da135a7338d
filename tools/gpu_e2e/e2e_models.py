"""Model presets for the GPU end-to-end measurement.

Imported both by the orchestrator (as ``tools.gpu_e2e.e2e_models``) and by the measured
process (``worker.py`` is run by file path, so this module is imported top-level there).
It must therefore stay free of package-relative imports and of heavy imports at module
level: torch, transformers and timm are imported inside ``build`` only, so that the
measured process times them.

A preset has a ``size`` variant: ``full`` (the issue's shapes), ``quick`` (a short GPU smoke
run) and ``tiny`` (a CPU smoke run, minutes on two cores).
"""

from __future__ import annotations

# Each preset: kind, torch.compile mode, dtype, builder args, and the warm-up inputs split
# into shape set 1 (replica A) and shape set 2 (added by replica B).
PRESETS: dict[str, dict[str, dict]] = {
    "llama": {
        "full": dict(
            kind="llama", mode="default", dtype="bfloat16",
            cfg=dict(num_hidden_layers=8, hidden_size=2048, intermediate_size=5632,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                     max_position_embeddings=2048),
            set1=[[1, 128]], set2=[[1, 512], [4, 256]],
        ),
        "quick": dict(
            kind="llama", mode="default", dtype="bfloat16",
            cfg=dict(num_hidden_layers=2, hidden_size=1024, intermediate_size=2816,
                     num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                     max_position_embeddings=2048),
            set1=[[1, 128]], set2=[[1, 512]],
        ),
        "tiny": dict(
            kind="llama", mode="default", dtype="float32",
            cfg=dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                     max_position_embeddings=256),
            set1=[[1, 16]], set2=[[1, 48]],
        ),
    },
    "llama-autotune": {
        # The issue allows 2 layers here to keep autotuning time bounded.
        "full": dict(
            kind="llama", mode="max-autotune-no-cudagraphs", dtype="bfloat16",
            cfg=dict(num_hidden_layers=2, hidden_size=2048, intermediate_size=5632,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                     max_position_embeddings=2048),
            set1=[[1, 128]], set2=[[1, 512]],
        ),
        "quick": dict(
            kind="llama", mode="max-autotune-no-cudagraphs", dtype="bfloat16",
            cfg=dict(num_hidden_layers=1, hidden_size=512, intermediate_size=1408,
                     num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                     max_position_embeddings=2048),
            set1=[[1, 128]], set2=[[1, 512]],
        ),
        "tiny": dict(
            kind="llama", mode="max-autotune-no-cudagraphs", dtype="float32",
            cfg=dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                     max_position_embeddings=256),
            set1=[[1, 16]], set2=[[1, 48]],
        ),
    },
    # A second causal-LM architecture (issue 16): Qwen2 has grouped-query attention and biased q/k/v
    # projections; same size class and shapes as "llama".
    "qwen2": {
        "full": dict(
            kind="qwen2", mode="default", dtype="bfloat16",
            cfg=dict(num_hidden_layers=8, hidden_size=2048, intermediate_size=5632,
                     num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                     max_position_embeddings=2048),
            set1=[[1, 128]], set2=[[1, 512], [4, 256]],
        ),
        "quick": dict(
            kind="qwen2", mode="default", dtype="bfloat16",
            cfg=dict(num_hidden_layers=2, hidden_size=1024, intermediate_size=2816,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                     max_position_embeddings=2048),
            set1=[[1, 128]], set2=[[1, 512]],
        ),
        "tiny": dict(
            kind="qwen2", mode="default", dtype="float32",
            cfg=dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                     max_position_embeddings=256),
            set1=[[1, 16]], set2=[[1, 48]],
        ),
    },
    "timm": {
        "full": dict(
            kind="timm", mode="default", dtype="bfloat16", arch="resnet50",
            set1=[[1, 3, 224, 224]], set2=[[8, 3, 224, 224]],
        ),
        "quick": dict(
            kind="timm", mode="default", dtype="bfloat16", arch="resnet18",
            set1=[[1, 3, 224, 224]], set2=[[8, 3, 224, 224]],
        ),
        "tiny": dict(
            kind="timm", mode="default", dtype="float32", arch="resnet18",
            set1=[[1, 3, 64, 64]], set2=[[2, 3, 64, 64]],
        ),
    },
}


# kind -> (transformers config class, model class), all built from a config with random weights
CAUSAL_LM = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def preset(model: str, size: str) -> dict:
    if model not in PRESETS:
        raise SystemExit(f"unknown model {model!r}; choose from {sorted(PRESETS)}")
    return dict(PRESETS[model][size])


def describe(p: dict) -> str:
    """One line for the report."""
    shapes = lambda s: ", ".join("(" + ",".join(map(str, x)) + ")" for x in s)  # noqa: E731
    if p["kind"] in CAUSAL_LM:
        c = p["cfg"]
        what = (f"{CAUSAL_LM[p['kind']][1]} {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                f"ffn {c['intermediate_size']}, heads {c['num_attention_heads']}/{c['num_key_value_heads']} kv, "
                f"vocab {c['vocab_size']}")
    else:
        what = f"timm {p['arch']} (channels_last)"
    return (f"{what}, {p['dtype']}, mode={p['mode']}; set 1: {shapes(p['set1'])}; "
            f"set 2: {shapes(p['set2'])}")


def build(p: dict, device: str):
    """Build the model with random weights (no download) and its inputs.

    Returns (model, make_inputs, call) where make_inputs(shapes) gives a list of tensors
    and call(fn, x) runs one forward pass with fn (the compiled model) and returns a tensor.
    """
    import torch

    dtype = getattr(torch, p["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    if p["kind"] in CAUSAL_LM:
        import transformers

        config_name, model_name = CAUSAL_LM[p["kind"]]
        cfg = getattr(transformers, config_name)(**p["cfg"])
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(transformers, model_name)(cfg).to(dtype)
        model.eval()
        vocab = p["cfg"]["vocab_size"]

        def make_inputs(shapes):
            return [torch.randint(0, vocab, tuple(s), generator=gen).to(device) for s in shapes]

        def call(fn, x):
            return fn(input_ids=x, use_cache=False).logits

        return model, make_inputs, call
    if p["kind"] == "timm":
        import timm

        torch.manual_seed(0)
        model = timm.create_model(p["arch"], pretrained=False)
        model = model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
        model.eval()

        def make_inputs(shapes):
            return [torch.randn(tuple(s), generator=gen).to(device=device, dtype=dtype)
                    .to(memory_format=torch.channels_last) for s in shapes]

        def call(fn, x):
            return fn(x)

        return model, make_inputs, call
    raise ValueError(p["kind"])
