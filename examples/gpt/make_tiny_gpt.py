#!/usr/bin/python3
"""The tiny simple_llm GPT committed in examples/gpt/data/ and PyTorch's outputs for it, for the C++ tests
(tests/unit-gpt.cpp) and the example's ctest.

    /usr/bin/python3 examples/gpt/make_tiny_gpt.py [output directory, default examples/gpt/data]

Builds simple_llm's GPT(vocab_size=50, max_seq_len=12, emb_size=16, num_heads=2, head_size=8, num_layers=2)
from a fixed torch seed in float64, saves it with GPT.save, and exports that checkpoint with export_gpt.py in
two dtypes. For each dtype D (F64, F32; the F32 model is the F64 one rounded, run by PyTorch in float32):
    tiny_gpt.D.safetensors     the model: simple_llm's state_dict names, the sizes in __metadata__
    tiny_gpt.D.io.safetensors  PyTorch's outputs (token ids stored as F64, exact):
        prompt [12], logits [12, 50]           forward(prompt): the logits at every position
        greedy.prompt [5], greedy [25]         generate(greedy.prompt, 20, do_sample=False): 13 of the 20
                                               steps run past max_seq_len (a cropped window)
        long.prompt [15], long [23]            generate(long.prompt, 8, do_sample=False): a prompt longer
                                               than max_seq_len
Every greedy step's best logit must beat the second by at least MIN_MARGIN, so that rounding differences
between PyTorch and C++ (about 1e-6 in float32) cannot change a token; the script fails otherwise.
Deterministic: rerunning writes identical files.
"""

import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from export_gpt import export_gpt, save_safetensors  # noqa: E402
from simple_llm_gpt import GPT  # noqa: E402

CONFIG = dict(vocab_size=50, max_seq_len=12, emb_size=16, num_heads=2, head_size=8, num_layers=2)
SEED = 2028
MIN_MARGIN = 1e-3
DTYPES = {"F64": torch.float64, "F32": torch.float32}


def greedy_with_margins(model, prompt, steps):
    """model.generate(prompt, steps, do_sample=False), and the smallest gap between the best and the second
    logit over its steps (recomputed here the way generate computes them)."""
    out = model.generate(prompt, steps, do_sample=False)
    smallest = float("inf")
    for n in range(prompt.size(1), out.size(1)):
        logits = model(out[:, :n][:, -model.max_seq_len:])[0, -1]
        top2 = torch.topk(logits, 2).values
        smallest = min(smallest, (top2[0] - top2[1]).item())
    return out, smallest


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "data")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)  # deterministic reductions
    torch.manual_seed(SEED)
    model64 = GPT(**CONFIG).double().eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, CONFIG["max_seq_len"]), generator=generator)
    greedy_prompt = torch.randint(0, CONFIG["vocab_size"], (1, 5), generator=generator)
    long_prompt = torch.randint(0, CONFIG["vocab_size"], (1, 15), generator=generator)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "tiny_gpt.pt")
        model64.save(checkpoint)  # the path a trained simple_llm model takes: GPT.save, then export_gpt.py
        saved = torch.load(checkpoint)
        for name, dtype in DTYPES.items():
            model_path = os.path.join(out_dir, f"tiny_gpt.{name}.safetensors")
            export_gpt(saved, model_path, dtype)
            model = GPT.load(checkpoint).to(dtype).eval()  # the rounded weights, run in that dtype
            with torch.no_grad():
                logits = model(prompt)[0]
                greedy, margin1 = greedy_with_margins(model, greedy_prompt, 20)
                long, margin2 = greedy_with_margins(model, long_prompt, 8)
            margin = min(margin1, margin2)
            if margin < MIN_MARGIN:
                sys.exit(f"{name}: a greedy step's top two logits are only {margin:.3g} apart; change SEED")
            ids = lambda t: t[0].to(torch.float64)  # noqa: E731
            save_safetensors({"prompt": ids(prompt), "logits": logits, "greedy.prompt": ids(greedy_prompt),
                              "greedy": ids(greedy), "long.prompt": ids(long_prompt), "long": ids(long)},
                             os.path.join(out_dir, f"tiny_gpt.{name}.io.safetensors"), {"format": "pt"})
            print(f"{name}: greedy {greedy[0].tolist()}")
            print(f"{name}: long {long[0].tolist()}; smallest top-2 margin {margin:.3g}")


if __name__ == "__main__":
    main()
