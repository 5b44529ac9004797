"""The verification prompt: question parsing, question typing and the prompt text.

Ported from the former HTTP service (docs/former-service.md, "Prompt"): `process_verification_data`,
`number_to_word`, `prompt_filter` / `contains_patterns`, `type_check` / `opposite_boolean` /
`fix_bool`, the damage and usage special cases, `std_prompt`, `fix_verification_questions`
and `generate_question_template`.

Every piece of prompt text lives in the constants at the top of this module, so a wording
change is one reviewed diff here and shows up as a new `prompt_hash` in the
`verification-attempts` topic.

Failure behaviour: `parse_questions` raises `ProcessingError(INVALID_QUESTION)` and
`build_prompt` raises `ProcessingError(INVALID_REQUEST)` for image counts out of range;
everything else here is total (never raises on odd question content).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from processors.errors import ErrorCode, ProcessingError
from processors.inference import IMAGE_PLACEHOLDER

# ---------------------------------------------------------------------------------------------
# Prompt text (all of it)
# ---------------------------------------------------------------------------------------------

PROMPT_INTRO: Final = (
    'You are verifying a reverse pickup (a customer return) of the product "{productname}".'
)

#: Filled by `_image_range`; `{count_word}` comes from `number_to_word`.
IMAGE_RANGE_ONE: Final = "Image {first} (one image) is {role_one}."
IMAGE_RANGE_MANY: Final = "Images {first} to {last} ({count_word} images) are {role_many}."
VENDOR_ROLE_ONE: Final = "a vendor reference image: the product as the vendor listed it"
VENDOR_ROLE_MANY: Final = "vendor reference images: the product as the vendor listed it"
PICKUP_ROLE_ONE: Final = "a pickup image: the returned product, photographed by the courier"
PICKUP_ROLE_MANY: Final = "pickup images: the returned product, photographed by the courier"

STRICT_INSTRUCTIONS: Final = """Strict instructions:
1. Judge only what is visible in the images; never guess or assume.
2. Compare the pickup images with the vendor images for every question below.
3. Answer every question once. Copy Type, Label, IsMandatory and ValueToCheck exactly as given.
4. If the pickup images are blurry, dark, cropped or do not show the product, set isRetakeImage \
to "true" and lower Confidence.
5. recommendation: "Accept" if the pickup product is the vendor product and every mandatory \
check passes; "Reject" if it is a different product or a mandatory check fails; "Partial" if \
it is the vendor product but a non-mandatory check fails; "Retry" if the pickup images are not \
good enough to decide.
6. Reply with one JSON object only: no text before or after it, no markdown, no comments."""

QUESTIONS_HEADER: Final = "Questions (each field says what to put in it):"

OUTPUT_FORMAT_HEADER: Final = "Answer in exactly this JSON format:"

OUTPUT_FORMAT: Final = """{
  "image_analysis": {
    "pickup_images": "what the pickup images show",
    "vendor_image": "what the vendor images show",
    "comparison": "how the pickup product compares with the vendor product"
  },
  "verification_results": [
    {
      "Type": "as given",
      "Label": "as given",
      "IsMandatory": "as given",
      "ValueToCheck": "as given",
      "Result": "your answer",
      "Evidence": "what you saw",
      "Confidence": 0,
      "isRetakeImage": "true or false"
    }
  ],
  "pickup_confidence": {
    "overall_score": 0,
    "confidence_factors": {
      "image_quality": 0,
      "attribute_visibility": 0,
      "matching_confidence": 0
    },
    "recommendation": "Accept, Reject, Partial or Retry"
  }
}"""

#: Appended on the retry after an unreadable first answer (as the former service's retry: "confidence numeric,
#: JSON schema").
STRICT_RETRY_SUFFIX: Final = """Your previous answer could not be read. This time:
- Reply with the JSON object only, exactly in the format above, with every key present.
- Confidence, overall_score, image_quality, attribute_visibility and matching_confidence must \
each be a plain number from 0 to 100 (no % sign, no words).
- recommendation must be exactly one of "Accept", "Reject", "Partial", "Retry".
- Use double quotes for every key and string, and no trailing commas."""

CONFIDENCE_INSTRUCTION: Final = (
    "A number from 0 to 100: how sure you are of Result, from what the images show."
)
RETAKE_INSTRUCTION: Final = (
    "'true' if the pickup images are too blurry, dark or incomplete to answer this question, "
    "otherwise 'false'."
)

#: Result instruction per answer type (the former service's `std_prompt`), for ordinary questions.
RESULT_TEMPLATES: Final[Mapping[str, str]] = {
    "boolean": (
        "Answer '{label}' by checking {focus}. Set Result to '{yes}' if the answer is yes, "
        "or '{no}' if it is no."
    ),
    "numeric": "Answer '{label}' by checking {focus}; set Result to that number, digits only.",
    "text": (
        "Answer '{label}' by checking {focus}. Set Result to '{value}' if the pickup images "
        "match it, otherwise write what the pickup images show, in a few words."
    ),
    "category": (
        "Answer '{label}' by checking {focus}. Set Result to '{value}' if the pickup product "
        "belongs to it, otherwise name the category the pickup product belongs to."
    ),
}

#: Damage and usage questions whose good answer is the negative ("Is the product damaged?"
#: expecting "No"): the model reports what it sees, so "No" means none was found.
DEFECT_RESULT_BOOLEAN: Final = (
    "Look closely at the pickup images for {defect}. Set Result to '{no}' if none is visible, "
    "or '{yes}' if any is visible."
)
DEFECT_RESULT_TEXT: Final = (
    "Look closely at the pickup images for {defect}. Set Result to '{value}' if none is visible, "
    "otherwise name what you see in a few words."
)
DEFECT_EVIDENCE: Final = (
    "Say where in the pickup images you looked and describe any {defect_short} you found, "
    "naming the image numbers."
)
DAMAGE_DESCRIPTION: Final = "damage: cracks, tears, dents, scratches, stains or broken parts"
USAGE_DESCRIPTION: Final = "signs of use: wear, washing, creases, dirt, or removed tags and labels"

EVIDENCE_TEMPLATE: Final = (
    "In one or two sentences, say what the pickup images show about {subject} and how it "
    "compares with the vendor images, naming the image numbers you used."
)

#: Per verification category: (what to check for the Result, subject of the Evidence).
CATEGORY_TEXT: Final[Mapping[str, tuple[str, str]]] = {
    "category_verification": (
        "whether the pickup product is the same kind of product as the vendor product",
        "the kind of product",
    ),
    "design_matching": (
        "whether the design, pattern and print of the pickup product match the vendor images",
        "the design, pattern and print",
    ),
    "quantity_verification": (
        "how many units of the product the pickup images show",
        "the number of units",
    ),
    "brand_verification": (
        "whether the brand name or logo on the pickup product matches the vendor images",
        "the brand name and logo",
    ),
    "packaging_verification": (
        "the packaging (box, cover, wrapping) of the pickup product against the vendor images",
        "the packaging",
    ),
    "size_verification": (
        "the size of the pickup product, from its size label or proportions",
        "the size",
    ),
    "color_verification": (
        "whether the colour of the pickup product matches the vendor images",
        "the colour",
    ),
    "price_verification": (
        "the price or MRP printed on any tag or label in the pickup images",
        "the printed price",
    ),
    "seal_verification": (
        "whether the seal or tamper-proof tape of the pickup product is intact",
        "the seal",
    ),
    "label_verification": (
        "the labels and tags on the pickup product against the vendor images",
        "the labels and tags",
    ),
    "sku_verification": (
        "the SKU, model number or barcode on the pickup product against the vendor images",
        "the SKU, model number or barcode",
    ),
    "product_matching": (
        "whether the pickup product is the same product as in the vendor images",
        "the product",
    ),
}

#: Keywords per verification category (the former service's `prompt_filter`). Order matters: the first
#: category whose keywords occur in a label wins ("price tag" is price, not label).
CATEGORY_KEYWORDS: Final[Mapping[str, tuple[str, ...]]] = {
    "category_verification": ("category", "product type", "type of product"),
    "design_matching": ("design", "pattern", "print", "style"),
    "quantity_verification": ("quantity", "qty", "count", "number of", "pieces", "pcs", "units"),
    "brand_verification": ("brand", "logo", "manufacturer"),
    "packaging_verification": ("packaging", "package", "packed", "box", "wrapper", "pouch"),
    "size_verification": ("size", "dimension", "length", "width"),
    "color_verification": ("color", "colour", "shade"),
    "price_verification": ("price", "mrp", "cost"),
    "seal_verification": ("seal", "sealed", "tamper"),
    "label_verification": ("label", "tag", "sticker"),
    "sku_verification": ("sku", "model number", "barcode", "serial number", "imei"),
    "product_matching": ("product match", "same product", "match", "matching", "identical"),
}

#: Used when no keyword matches: every question compares pickup with vendor images.
DEFAULT_CATEGORY: Final = "product_matching"

DAMAGE_KEYWORDS: Final = (
    "damage",
    "damaged",
    "broken",
    "torn",
    "tear",
    "scratch",
    "scratched",
    "crack",
    "cracked",
    "dent",
    "dented",
    "defect",
    "defective",
    "stain",
    "stained",
    "ripped",
    "leak",
    "leaking",
)
USAGE_KEYWORDS: Final = (
    "used",
    "usage",
    "worn",
    "wear",
    "washed",
    "signs of use",
    "tag removed",
    "tags removed",
)

#: ValueToCheck values that mark a damage/usage question as "good answer is negative".
NEGATIVE_VALUES: Final = frozenset(
    {"no", "false", "n", "0", "none", "nil", "not damaged", "no damage", "not used", "unused"}
)

# ---------------------------------------------------------------------------------------------
# Limits and vocabularies
# ---------------------------------------------------------------------------------------------

#: More questions than this make the prompt longer than the model answers well.
MAX_QUESTIONS: Final = 50
#: `number_to_word` covers 1-59, as in the former service.
MAX_WORD_NUMBER: Final = 59

QuestionKind = Literal["boolean", "numeric", "text", "category"]

_TYPE_NAMES: Final[Mapping[str, QuestionKind]] = {
    "boolean": "boolean",
    "bool": "boolean",
    "yes/no": "boolean",
    "yesno": "boolean",
    "checkbox": "boolean",
    "toggle": "boolean",
    "number": "numeric",
    "numeric": "numeric",
    "integer": "numeric",
    "int": "numeric",
    "float": "numeric",
    "decimal": "numeric",
    "text": "text",
    "string": "text",
    "str": "text",
    "textarea": "text",
    "category": "category",
    "dropdown": "category",
    "select": "category",
    "enum": "category",
    "option": "category",
    "options": "category",
}

_TRUE_WORDS: Final = frozenset({"yes", "true", "y", "1"})
_FALSE_WORDS: Final = frozenset({"no", "false", "n", "0"})
#: Boolean spelling families; a value keeps its family and letter case when flipped.
_BOOL_FAMILIES: Final[Mapping[str, tuple[str, str]]] = {
    "yes": ("yes", "no"),
    "no": ("yes", "no"),
    "true": ("true", "false"),
    "false": ("true", "false"),
    "y": ("y", "n"),
    "n": ("y", "n"),
    "1": ("1", "0"),
    "0": ("1", "0"),
}
_NUMERIC_RE: Final = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*%?\s*$")

_ONES: Final = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS: Final = ("twenty", "thirty", "forty", "fifty")


def convert_to_regex(keywords: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive word-boundary regex for any keyword (an optional plural s/es allowed)."""
    alternatives = "|".join(r"\s+".join(map(re.escape, k.split())) for k in keywords)
    return re.compile(rf"\b(?:{alternatives})(?:e?s)?\b", re.IGNORECASE)


_CATEGORY_PATTERNS: Final = tuple(
    (name, convert_to_regex(words)) for name, words in CATEGORY_KEYWORDS.items()
)
_DAMAGE_RE: Final = convert_to_regex(DAMAGE_KEYWORDS)
_USAGE_RE: Final = convert_to_regex(USAGE_KEYWORDS)
# Characters that could break the prompt's structure: `<image>` placeholders, braces and
# fences. Control characters go too.
_UNSAFE_CHARS_RE: Final = re.compile(r"[<>{}`\\\x00-\x08\x0b-\x1f\x7f]")
_SPACES_RE: Final = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------
# Question parsing
# ---------------------------------------------------------------------------------------------


def _invalid(message: str) -> ProcessingError:
    return ProcessingError(ErrorCode.INVALID_QUESTION, message, "prompt")


def _load_question_text(question: str) -> Any:
    """json.loads, then single quotes to double, then a Python literal (the former service's order)."""
    # RecursionError: json and literal_eval both recurse on nesting like "[[[[...".
    try:
        return json.loads(question)
    except (ValueError, RecursionError):
        pass
    try:
        return json.loads(question.replace("'", '"'))
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(question.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise _invalid(f"question is neither JSON nor a Python literal: {exc}") from None


def parse_questions(question: str) -> list[dict[str, Any]]:
    """Parse the request's `question` text into a list of question dicts.

    Accepts a JSON list, the same with single quotes, a Python literal (True/None, single
    quotes), and a `{"Question": [...]}` wrapper (key matched case-insensitively). Each item
    must be a dict whose `Label` is a non-empty string; items are returned unchanged.

    Raises `ProcessingError(INVALID_QUESTION, stage="prompt")` for anything else, for an empty
    list and for more than `MAX_QUESTIONS` items.
    """
    loaded = _load_question_text(question)
    if isinstance(loaded, dict):
        wrapped = [v for k, v in loaded.items() if isinstance(k, str) and k.lower() == "question"]
        if not wrapped:
            raise _invalid("question object has no 'Question' list")
        loaded = wrapped[0]
    if not isinstance(loaded, list | tuple):
        raise _invalid(f"question must be a list of objects, got {type(loaded).__name__}")
    if not loaded:
        raise _invalid("question list is empty")
    if len(loaded) > MAX_QUESTIONS:
        raise _invalid(f"{len(loaded)} questions; at most {MAX_QUESTIONS} are allowed")
    items: list[dict[str, Any]] = []
    for index, item in enumerate(loaded):
        if not isinstance(item, dict):
            raise _invalid(f"question {index} is a {type(item).__name__}, not an object")
        label = item.get("Label")
        if not isinstance(label, str) or not label.strip():
            raise _invalid(f"question {index} has no Label")
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------
# Numbers, categories and value types
# ---------------------------------------------------------------------------------------------


def number_to_word(n: int) -> str:
    """English words for 1-59 ("one", "twenty-one"); raises ValueError outside that range."""
    if isinstance(n, bool) or not 1 <= n <= MAX_WORD_NUMBER:
        raise ValueError(f"number_to_word covers 1-{MAX_WORD_NUMBER}, got {n!r}")
    if n < 20:
        return _ONES[n - 1]
    tens, ones = divmod(n, 10)
    word = _TENS[tens - 2]
    return f"{word}-{_ONES[ones - 1]}" if ones else word


def classify_question(label_or_text: str) -> str:
    """The verification category of a label, by keyword (the former service's `contains_patterns`).

    Returns the first category of `CATEGORY_KEYWORDS` whose keyword occurs as a whole word,
    else `DEFAULT_CATEGORY`.
    """
    for name, pattern in _CATEGORY_PATTERNS:
        if pattern.search(label_or_text):
            return name
    return DEFAULT_CATEGORY


def as_text(value: Any) -> str:
    """A question field as text: JSON spelling for booleans and null, ints without '.0'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def boolean_truth(value: Any) -> bool | None:
    """True/False for yes/no, true/false, y/n, 1/0 (any case) and booleans; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return True if value == 1 else False if value == 0 else None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def value_kind(value: Any) -> Literal["boolean", "numeric", "text"]:
    """Type of a bare value (the former service's `type_check`); "1"/"0" count as numbers, not booleans."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "numeric"
    text = as_text(value).strip()
    if text.lower() in _TRUE_WORDS - {"1"} or text.lower() in _FALSE_WORDS - {"0"}:
        return "boolean"
    if _NUMERIC_RE.match(text):
        return "numeric"
    return "text"


def question_kind(question: Mapping[str, Any]) -> QuestionKind:
    """Answer type of a question: its `Type` if recognised, else inferred from ValueToCheck."""
    declared = as_text(question.get("Type")).strip().lower()
    if declared in _TYPE_NAMES:
        return _TYPE_NAMES[declared]
    return value_kind(question.get("ValueToCheck"))


def _render_bool(truth: bool, style: Any) -> str:
    """`truth` spelled like `style` (family and letter case); JSON true/false by default."""
    if isinstance(style, str) and style.strip().lower() in _BOOL_FAMILIES:
        sample = style.strip()
        yes, no = _BOOL_FAMILIES[sample.lower()]
        word = yes if truth else no
        if sample.isupper() and len(sample) > 1:
            return word.upper()
        if sample[0].isupper():
            return word.capitalize()
        return word
    return "true" if truth else "false"


def opposite_boolean(value: Any) -> str | None:
    """The opposite boolean in the same spelling ("Yes" -> "No", "TRUE" -> "FALSE", "1" -> "0").

    None when `value` is not a boolean spelling.
    """
    truth = boolean_truth(value)
    if truth is None:
        return None
    return _render_bool(not truth, value)


def fix_bool(value: Any, style: Any) -> str:
    """A boolean answer spelled like `style` (the ValueToCheck): True/"yes" -> "Yes".

    Values that are not boolean spellings come back as text, unchanged.
    """
    truth = boolean_truth(value)
    if truth is None or boolean_truth(style) is None:
        return as_text(value)
    return _render_bool(truth, style)


def defect_kind(label_or_text: str) -> Literal["damage", "usage"] | None:
    """Return "damage" or "usage" when the text asks about either, else None."""
    if _DAMAGE_RE.search(label_or_text):
        return "damage"
    if _USAGE_RE.search(label_or_text):
        return "usage"
    return None


def is_negative_value(value: Any) -> bool:
    """Whether a ValueToCheck is a negative ("No", "false", "none", "not damaged")."""
    return clean_string(as_text(value)).lower() in NEGATIVE_VALUES


# ---------------------------------------------------------------------------------------------
# Prompt assembly
# ---------------------------------------------------------------------------------------------


def clean_string(value: str) -> str:
    """Drop characters that could break the prompt and collapse whitespace.

    The dropped characters are `<>`, braces, backticks and control characters: a label
    with `<image>` must not add a placeholder.
    """
    return _SPACES_RE.sub(" ", _UNSAFE_CHARS_RE.sub(" ", value)).strip()


def _result_instruction(question: Mapping[str, Any], label: str, value: str) -> tuple[str, str]:
    """(Result instruction, Evidence instruction) for one question."""
    kind = question_kind(question)
    defect = defect_kind(label)
    if defect is not None and is_negative_value(value):
        description = DAMAGE_DESCRIPTION if defect == "damage" else USAGE_DESCRIPTION
        short = "damage" if defect == "damage" else "signs of use"
        evidence = DEFECT_EVIDENCE.format(defect_short=short)
        opposite = opposite_boolean(value)
        if opposite is not None:
            result = DEFECT_RESULT_BOOLEAN.format(defect=description, no=value, yes=opposite)
        else:
            result = DEFECT_RESULT_TEXT.format(defect=description, value=value)
        return result, evidence
    focus, subject = CATEGORY_TEXT[classify_question(label)]
    evidence = EVIDENCE_TEMPLATE.format(subject=subject)
    if kind == "boolean":
        style = value if boolean_truth(value) is not None else "Yes"
        result = RESULT_TEMPLATES["boolean"].format(
            focus=focus, label=label, yes=_render_bool(True, style), no=_render_bool(False, style)
        )
    else:
        result = RESULT_TEMPLATES[kind].format(focus=focus, label=label, value=value)
    return result, evidence


def fix_verification_questions(questions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Questions as the prompt shows them.

    Type/Label/IsMandatory/ValueToCheck become cleaned text, and
    Result/Evidence/Confidence/isRetakeImage hold the instruction for each field.

    Never raises: unknown types are inferred from ValueToCheck, unknown labels fall back to
    `DEFAULT_CATEGORY`.
    """
    fixed: list[dict[str, Any]] = []
    for question in questions:
        label = clean_string(as_text(question.get("Label")))
        value = clean_string(as_text(question.get("ValueToCheck")))
        result, evidence = _result_instruction(question, label, value)
        fixed.append(
            {
                "Type": clean_string(as_text(question.get("Type"))),
                "Label": label,
                "IsMandatory": clean_string(as_text(question.get("IsMandatory"))),
                "ValueToCheck": value,
                "Result": result,
                "Evidence": evidence,
                "Confidence": CONFIDENCE_INSTRUCTION,
                "isRetakeImage": RETAKE_INSTRUCTION,
            }
        )
    return fixed


def _image_range(first: int, count: int, role_one: str, role_many: str) -> str:
    if count == 1:
        return IMAGE_RANGE_ONE.format(first=first, role_one=role_one)
    return IMAGE_RANGE_MANY.format(
        first=first, last=first + count - 1, count_word=number_to_word(count), role_many=role_many
    )


def build_prompt(
    productname: str,
    questions: Sequence[Mapping[str, Any]],
    vendor_count: int,
    pickup_count: int,
    *,
    strict: bool = False,
) -> str:
    """The full verification prompt (the former service's `generate_question_template`).

    Holds exactly `vendor_count + pickup_count` `IMAGE_PLACEHOLDER`s, vendor images first, so
    it lines up with the tiles the engine receives. `strict=True` appends
    `STRICT_RETRY_SUFFIX` for the retry after an unreadable answer.

    Raises `ProcessingError(INVALID_REQUEST, stage="prompt")` when either count is below 1
    or the total is above `MAX_WORD_NUMBER`.
    """
    total = vendor_count + pickup_count
    if vendor_count < 1 or pickup_count < 1 or total > MAX_WORD_NUMBER:
        raise ProcessingError(
            ErrorCode.INVALID_REQUEST,
            f"need 1+ vendor and 1+ pickup images, at most {MAX_WORD_NUMBER} in all; "
            f"got {vendor_count} and {pickup_count}",
            "prompt",
        )
    images = "\n".join(f"Image-{i}: {IMAGE_PLACEHOLDER}" for i in range(1, total + 1))
    ranges = " ".join(
        (
            _image_range(1, vendor_count, VENDOR_ROLE_ONE, VENDOR_ROLE_MANY),
            _image_range(vendor_count + 1, pickup_count, PICKUP_ROLE_ONE, PICKUP_ROLE_MANY),
        )
    )
    question_block = json.dumps(fix_verification_questions(questions), indent=2, ensure_ascii=False)
    parts = [
        images,
        PROMPT_INTRO.format(productname=clean_string(productname)),
        ranges,
        STRICT_INSTRUCTIONS,
        f"{QUESTIONS_HEADER}\n{question_block}",
        f"{OUTPUT_FORMAT_HEADER}\n{OUTPUT_FORMAT}",
    ]
    if strict:
        parts.append(STRICT_RETRY_SUFFIX)
    return "\n\n".join(parts)


def prompt_hash(prompt: str) -> str:
    """First 16 hex characters of the prompt's SHA-256: groups attempts by prompt wording."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
