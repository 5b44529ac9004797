"""InternVL inference: checkpoint detection and conversion, the static decoder, the engines.

The public surface of the package; code outside it imports from here. Modules:
`config` (`EngineConfig`, error stage), `chat` (prompts and image placeholders),
`checkpoint` (layout detection, version ids), `convert` (original -> native weights),
`vision` (image features, feature cache), `cuda` (streams, events, graph capture), `decoder` (static
KV cache, CUDA graphs) with `decode_attention` (the split-key attention op), `base` and
`engines` (the engines and their factory).
"""

from processors.internvl.base import InternVLEngineBase
from processors.internvl.chat import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    INTERNVL25_SYSTEM_MESSAGE,
    build_chat_prompt,
    expand_image_placeholders,
)
from processors.internvl.checkpoint import (
    CONVERTIBLE_LLMS,
    CheckpointKind,
    checkpoint_kind,
    has_remote_code,
    is_convertible,
    model_version_id,
    read_checkpoint_config,
    weight_files,
)
from processors.internvl.config import (
    STAGE,
    TIMING_STAGES,
    AttnName,
    DecodeAttentionName,
    DecodeName,
    DeviceName,
    DtypeName,
    EngineConfig,
    FormatName,
    coded_failure,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
)
from processors.internvl.convert import (
    convert_original_config,
    convert_original_state_dict,
    load_state_dict_files,
)
from processors.internvl.cuda import capture_graph
from processors.internvl.decode_attention import (
    MAX_SPLITS,
    SplitKeyAttention,
    auto_splits,
    chunk_attention,
    dense_chunk_attention,
)
from processors.internvl.decoder import (
    DecodeSession,
    StaticGreedyDecoder,
    attention_geometry,
    rotate_half,
)
from processors.internvl.engines import (
    NativeInternVLEngine,
    RemoteCodeInternVLEngine,
    create_engine,
    load_engine,
)
from processors.internvl.fused import (
    FusedProjections,
    fuse_layer,
    fused_of,
    mlp_output,
    project_fused,
    unfuse_layer,
)
from processors.internvl.vision import (
    FeatureCache,
    StagedImages,
    VisionEncoder,
    content_key,
    patch_projection_as_matmul,
)

__all__ = [
    "CONVERTIBLE_LLMS",
    "IMG_CONTEXT_TOKEN",
    "IMG_END_TOKEN",
    "IMG_START_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "INTERNVL25_SYSTEM_MESSAGE",
    "MAX_SPLITS",
    "STAGE",
    "TIMING_STAGES",
    "AttnName",
    "CheckpointKind",
    "DecodeAttentionName",
    "DecodeName",
    "DecodeSession",
    "DeviceName",
    "DtypeName",
    "EngineConfig",
    "FeatureCache",
    "FormatName",
    "FusedProjections",
    "InternVLEngineBase",
    "NativeInternVLEngine",
    "RemoteCodeInternVLEngine",
    "SplitKeyAttention",
    "StagedImages",
    "StaticGreedyDecoder",
    "VisionEncoder",
    "attention_geometry",
    "auto_splits",
    "build_chat_prompt",
    "capture_graph",
    "checkpoint_kind",
    "chunk_attention",
    "coded_failure",
    "content_key",
    "convert_original_config",
    "convert_original_state_dict",
    "create_engine",
    "dense_chunk_attention",
    "expand_image_placeholders",
    "fuse_layer",
    "fused_of",
    "has_remote_code",
    "is_convertible",
    "load_engine",
    "load_state_dict_files",
    "mlp_output",
    "model_version_id",
    "patch_projection_as_matmul",
    "project_fused",
    "read_checkpoint_config",
    "resolve_attn_implementation",
    "resolve_device",
    "resolve_dtype",
    "rotate_half",
    "unfuse_layer",
    "weight_files",
]
