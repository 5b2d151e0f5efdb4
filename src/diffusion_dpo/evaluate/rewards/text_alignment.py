"""Text alignment, the DrawBench table's recipe (Curriculum-DPO): caption the image with a vision-language
model, then the cosine between sentence-transformers embeddings of the caption and of the prompt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusion_dpo.errors import ModelLoadError, UserError
from diffusion_dpo.evaluate.rewards.base import RewardModel
from diffusion_dpo.evaluate.rewards.hub import device_dtype, from_pretrained, load_error
from diffusion_dpo.runtime import hub_offline

DEFAULT_CAPTION_QUERY = "Answer concisely: what is going on in this image?"


class HFCaptioner:
    """Captions images with any transformers image-to-text / vision-language model.
    With a chat template (LLaVA, ...) the query is asked as a user turn; without one (BLIP-style
    captioners) the model captions unconditionally and the query is not used."""

    def __init__(self, source: str, device, dtype, query: str = DEFAULT_CAPTION_QUERY, temperature: float = 0.2,
                 max_new_tokens: int = 60, seed: int = 0):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        flag = "--metric-option text_alignment.captioner=PATH"
        self.processor = from_pretrained(AutoProcessor, source, "captioning processor", flag)
        self.model = from_pretrained(AutoModelForImageTextToText, source, "captioning model", flag)
        self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.query, self.temperature, self.max_new_tokens, self.seed = query, temperature, max_new_tokens, seed
        self.chat = bool(self.processor.chat_template)
        self.source = source

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.query}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        sample = self.temperature > 0
        torch.manual_seed(self.seed)  # sampled captions are reproducible
        gen = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                  **({"temperature": self.temperature} if sample else {}))
        if self.chat:  # decoder-only VLMs return the prompt too
            gen = gen[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(gen, skip_special_tokens=True)]


class TextAlignment(RewardModel):
    """Cosine between sentence-transformers embeddings of an image caption and of
    "The image contains {prompt}" (Curriculum-DPO's DrawBench table). `captioner` is a model id/folder
    or a callable (images) -> captions; `sentence_model` a sentence-transformers id/folder."""

    DEFAULT_CAPTIONER = "llava-hf/llava-1.5-13b-hf"
    DEFAULT_SENTENCE_MODEL = "sentence-transformers/paraphrase-MiniLM-L6-v2"

    def __init__(self, source: str | None = None, device="cpu", dtype=torch.float32,
                 captioner: str | Callable[[list], list[str]] | None = None, sentence_model: str | None = None,
                 query: str = DEFAULT_CAPTION_QUERY, template: str = "The image contains {prompt}",
                 temperature: float = 0.2, max_new_tokens: int = 60, batch_size: int = 8):
        device, dtype = device_dtype(device, dtype)
        captioner = captioner or source or self.DEFAULT_CAPTIONER
        sentence_model = sentence_model or self.DEFAULT_SENTENCE_MODEL
        self.name = "text_alignment"
        if callable(captioner):
            self.captioner, cap_name = captioner, getattr(captioner, "__name__", type(captioner).__name__)
        else:
            self.captioner, cap_name = HFCaptioner(captioner, device, dtype, query, temperature, max_new_tokens), captioner
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ModelLoadError("text_alignment needs sentence-transformers: pip install 'diffusion-dpo[eval]'") from err
        self.encoder = _load_sentence_model(SentenceTransformer, sentence_model, device)
        self.template, self.batch_size = template, batch_size
        self.last_captions: list[str] = []
        self.info = {"metric": "text_alignment", "model": f"captioner {cap_name} + sentences {sentence_model}",
                     "version": "Curriculum-DPO DrawBench recipe",
                     "scale": "cosine in [-1, 1] (DrawBench table: about 0.57-0.61)",
                     "preprocessing": f"caption query {query!r} (temperature {temperature}); "
                                      f"prompt wrapped as {template!r}"}

    @torch.no_grad()
    def _score_batch(self, images, prompts):
        captions = list(self.captioner(images))
        if len(captions) != len(images):
            raise UserError(f"text_alignment: the captioner returned {len(captions)} captions for {len(images)} images")
        self.last_captions = captions
        a = self.encoder.encode(captions, convert_to_tensor=True, normalize_embeddings=True)
        b = self.encoder.encode([self.template.format(prompt=p) for p in prompts], convert_to_tensor=True,
                                normalize_embeddings=True)
        return (a * b).sum(-1)


def _load_sentence_model(cls: Any, source: str, device) -> Any:
    local = Path(source).exists()
    try:
        return cls(source, device=str(device), local_files_only=local or hub_offline())
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise load_error("sentence-transformers model", source, err,
                          "--metric-option text_alignment.sentence_model=PATH") from err
