"""Loads a Hugging Face model directory with transformers and prints, as one JSON line, the mean
next-token loss over every full window of a uint32/uint16 token file, with the windows
`gantry eval` uses (window i = tokens[i*T : i*T+T+1], i = 0 .. floor((N-1)/T)-1).

Usage: python3 hf_eval.py MODEL_DIR TOKENS(.u32|.bin) SEQ_LEN
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, path, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dtype = np.uint16 if path.endswith(".bin") else np.uint32
    tokens = torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    windows = (len(tokens) - 1) // seq
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows, 8):
            batch = torch.stack([tokens[w * seq : w * seq + seq + 1] for w in range(i, min(i + 8, windows))])
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
    print(json.dumps({"loss": total / count, "tokens": count, "model_type": model.config.model_type}))


if __name__ == "__main__":
    main()
