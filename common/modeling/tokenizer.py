"""A small byte-level BPE tokenizer trained offline, for the tiny test/simulation model.

Training is deterministic: the corpus below is fixed text (chat markers, the response
format, clinical question templates and label words), so every machine builds the same
vocabulary. Byte-level BPE still encodes any text, unknown words just take more tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "train_tiny_tokenizer"]

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style ChatML; an image part becomes <|vision_start|><|image_pad|><|vision_end|>,
# which the processor expands to one pad token per merged image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = """
Above is a chest X-ray image of a patient. What is the diagnosis of the patient in the X-ray image?
Answer with one phrase from the following: Answer with one or multiple phrases from the following:
Above is a dermoscopy image of a patient. What is the diagnosis of the patient in the dermoscopy image?
Above is a 12-lead ECG of a patient. What is the rhythm? Above is a fundus image of a patient.
Grade the diabetic retinopathy. Above is a chest CT scan of a patient. Above is a brain MRI.
Above is an ultrasound image. Above is a mammogram. What is the BIRAD classification?
Laboratory report of a patient: Does the patient have diabetes mellitus?
Fasting glucose mg/dL HbA1c % Creatinine Sodium mmol/L Potassium Hemoglobin g/dL
White blood cells Platelets Cholesterol Triglycerides ALT AST U/L (H) (L)
Normal Pneumonia Opacity Effusion Cardiomegaly Atelectasis Edema Consolidation Pneumothorax
No Finding Support Devices Fracture Lung Lesion Enlarged Cardiomediastinum Pleural Other
Benign nevus Melanoma Basal Cell Carcinoma Nevus AKIEC Other Benign Malignant
Normal sinus rhythm Tachycardia Bradycardia Atrial fibrillation Myocardial infarction
Hypertrophy Conduction disturbance ST/T change
No DR Diabetic retinopathy Mild Moderate Severe Proliferative
Diabetes No diabetes Yes No Positive Negative BIRAD 1 BIRAD 2 BIRAD 3 BIRAD 4 BIRAD 5
no nodule has nodule hemorrhage tumor glioma meningioma pituitary
<think> </think> \\boxed{ } ```json [ ] {"bbox_2d": [x1, y1, x2, y2], "label": ""}
You FIRST think about the reasoning process as an internal monologue and then provide the final
answer. The reasoning process MUST BE enclosed within think tags. The final answer MUST BE put in
boxed. You are a careful clinical assistant. system user assistant
0 1 2 3 4 5 6 7 8 9 10 12 20 25 50 60 75 90 100 120 150 180 200 250 300 0.5 1.0 2.5 7.5 8.4
The patient is years old. Age Sex Male Female frontal lateral view image images
"""


def _corpus(repeats: int) -> list[str]:
    lines = [ln.strip() for ln in _WORDS.strip().splitlines() if ln.strip()]
    return lines * repeats


def train_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the deterministic tiny tokenizer (about a second on one core)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(repeats=8), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
