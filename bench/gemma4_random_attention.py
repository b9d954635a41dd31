"""Why random real-size Gemma 4 weights drift between any two bf16 kernels, and what tiny.temper_unscaled_attention
changes: Gemma 4's E2B text layout (vocabulary cut to 16k so it fits a CPU) scored in fp32 and in bf16 with the
same weights, per-token |difference| of the log-probs of tokens sampled from the bf16 model, first with the q/k
norm weights as built (ones: attention unscaled), then tempered (d^-1/4 each: scores spread as 1/sqrt(d) gives).

    .venv/bin/python bench/gemma4_random_attention.py [INTERMEDIATE [TOKENS]]    # ~10 minutes on 2 cores
"""
import copy
import sys
import time

import torch
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

from vlrl_cli.model.families import _GEMMA4_E2B_TEXT
from vlrl_cli.model.tiny import temper_unscaled_attention

VOCAB = 16384
width = int(sys.argv[1]) if len(sys.argv) > 1 else 6144
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 640
config = Gemma4TextConfig(**dict(_GEMMA4_E2B_TEXT, vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB,
                                 intermediate_size=width, pad_token_id=0, bos_token_id=2, eos_token_id=1))
config._attn_implementation = "sdpa"
torch.manual_seed(0)
fp32 = Gemma4ForCausalLM(config).eval()
bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
ids = torch.randint(3, VOCAB, (1, tokens))


def logprobs(model):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float()[0], -1)


def compare(label):
    t = time.time()
    low, high = logprobs(bf16), logprobs(fp32)
    sampled = torch.multinomial(low.exp(), 1, generator=torch.Generator().manual_seed(1))
    diff = (low.gather(1, sampled) - high.gather(1, sampled)).abs()[:, 0]
    print(f"{label}: mean |dlogp| of sampled tokens {diff.mean():.4f}, p90 {diff.quantile(0.9):.4f} "
          f"({time.time() - t:.0f} s)", flush=True)


print(f"{sum(p.numel() for p in fp32.parameters()) / 1e9:.2f} B parameters, {tokens} tokens", flush=True)
compare("q/k norms of one (as built)")
for model in (fp32, bf16):
    temper_unscaled_attention(model)
compare("q/k norms of d^-1/4 (tempered)")
