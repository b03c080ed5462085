# one-off diagnostic of infer_peer's greedy agreement: engine vs HF generate vs vLLM top-5 at the first tokens
import json, os, sys, gc
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"; os.environ["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
import torch, infer_7b, infer_peer
from transformers import AutoModelForImageTextToText, AutoProcessor
from avlabel.core.prompts import load_prompts
from avlabel.infer.engine import ClipPreparer, chat_text
cfg = infer_7b.read_config(infer_7b.CONFIG); infer_7b.set_frame_shape(cfg, False)
d = "/dev/shm/peer_model"
model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.bfloat16, device_map={"": "cuda"}, attn_implementation="sdpa").eval()
proc = AutoProcessor.from_pretrained(d); prompts = load_prompts(); text = chat_text(proc, prompts)
clips = range(512, 514)
eng = infer_peer.engine_greedy(model, proc, prompts, clips, 8)
prep = ClipPreparer(proc, text, model.dtype); out = {"engine": eng, "hf": {}, "hf_top5": {}}
with torch.inference_mode():
    for i in clips:
        x = {k: v.cuda() for k, v in prep(infer_7b.synthetic_frames(f"synthetic-{i}", None)).items()}
        g = model.generate(**x, max_new_tokens=8, min_new_tokens=8, do_sample=False, repetition_penalty=1.0)
        out["hf"][i] = g[0, x["input_ids"].shape[1]:].tolist()
        lp = model(**x).logits[0, -1].float().log_softmax(-1); v, ix = lp.topk(5)
        out["hf_top5"][i] = list(zip(ix.tolist(), [round(a, 4) for a in v.tolist()]))
print(json.dumps(out), flush=True)
del model; gc.collect(); torch.cuda.empty_cache()
from transformers.processing_utils import ProcessorMixin
ProcessorMixin.validate_inputs = lambda self, *a, **k: None
from vllm import LLM, SamplingParams
llm = LLM(model=d, dtype="bfloat16", seed=0, max_model_len=4096, gpu_memory_utilization=0.6, limit_mm_per_prompt={"image": 0, "video": 1}, mm_processor_kwargs={"fps": 2.0, "do_sample_frames": False})
res = llm.generate(infer_peer.vllm_inputs(text, clips), SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, logprobs=5), use_tqdm=False)
for i, r in zip(clips, res):
    o = r.outputs[0]
    print("VLLM", i, list(o.token_ids), [(t, round(l.logprob, 4)) for t, l in sorted(o.logprobs[0].items(), key=lambda kv: -kv[1].logprob)], flush=True)
