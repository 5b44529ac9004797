"""The vision side of the native engine's static path: image features, cached and batched.

The vision tower runs over all tiles of a batch in fixed-size tile batches (pinned host
memory); the first image(s) of each request, the vendor images, go through a
content-addressed, memory-bounded feature cache (`FeatureCache`). On CUDA the work is
queued on a second stream, so it overlaps the decode of the previous batch.
`patch_projection_as_matmul` replaces the patch-embedding convolution by the equal
matrix product (much faster on H100).

The slot engine stages a request's images off its scheduler thread (`VisionEncoder.stage`:
a pinned copy of the tiles and the cache keys), so the thread that keeps the GPU fed only
queues copies and the vision tower (`image_features(..., staged=...)`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from processors.inference import PreparedRequest
from processors.internvl.cuda import new_event, new_stream

ImagePlan = list[tuple[str, Any]]
"""Per image of a request: ("cached", feature tensor) or ("todo", index into the work list)."""


@dataclass(frozen=True, slots=True)
class StagedImages:
    """A request's images made ready for the vision tower (`VisionEncoder.stage`).

    `images`: one (tiles, 3, size, size) tensor per image in the model's dtype, in pinned
    host memory when the model is on CUDA; `keys`: the content keys of the cache
    candidates (the first `cache_images` images), in order.
    """

    images: tuple[Any, ...]
    keys: tuple[str, ...]


def content_key(tiles: Any) -> str:
    """Content address of an image's tiles: sha256 over shape, dtype and raw bytes."""
    import torch

    array = tiles.detach().to("cpu").contiguous()
    if array.dtype == torch.bfloat16:
        array = array.view(torch.int16)
    digest = hashlib.sha256(f"{tuple(array.shape)}:{array.dtype}".encode())
    digest.update(memoryview(array.numpy()).cast("B"))
    return digest.hexdigest()


class FeatureCache:
    """Memory-bounded LRU of projected image features, keyed by `content_key`.

    Vendor images repeat across the returns of a product; their vision-tower output is
    reused instead of recomputed. Values stay on the model's device; `max_bytes` bounds
    the sum of their sizes (an entry larger than the bound is not kept).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and zero the counters."""
        self._entries.clear()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        """The cached features of `key` (now most recently used), or None (a miss)."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        """Keep a copy of `value` under `key`, evicting the least recently used entries.

        A key already present, or a value larger than `max_bytes`, is not stored.
        """
        size = int(value.numel() * value.element_size())
        if key in self._entries or size > self.max_bytes:
            return
        # A clone, so the entry does not pin the whole batch's feature tensor.
        self._entries[key] = value.clone()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= int(evicted.numel() * evicted.element_size())


def patch_projection_as_matmul(conv: Any) -> bool:
    """Run a patch-embedding convolution (kernel == stride, no padding) as one matmul.

    The same function as the convolution (each output pixel is one patch times the
    flattened kernel), but cuDNN runs this convolution shape on a slow non-tensor-core
    path on H100 (about 17 ms for 256 tiles against well under 1 ms as a matrix product).
    Replaces `conv.forward` on this instance; parameters and state dict are unchanged.
    Returns False, and changes nothing, when the convolution is not of that form.
    """
    if (
        tuple(conv.kernel_size) != tuple(conv.stride)
        or any(conv.padding)
        or any(d != 1 for d in conv.dilation)
        or conv.groups != 1
    ):
        return False

    def forward(pixels: Any) -> Any:
        import torch

        batch, channels, height, width = pixels.shape
        kernel_h, kernel_w = conv.kernel_size
        rows, cols = height // kernel_h, width // kernel_w
        patches = pixels[:, :, : rows * kernel_h, : cols * kernel_w]
        patches = patches.reshape(batch, channels, rows, kernel_h, cols, kernel_w)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch * rows * cols, -1)
        weight = conv.weight.reshape(conv.out_channels, -1)
        bias = conv.bias
        out = patches @ weight.t() if bias is None else torch.addmm(bias, patches, weight.t())
        return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)

    conv.forward = forward
    return True


def _per_image(parts: list[Any], counts: list[int]) -> list[Any]:
    """The tower's outputs of consecutive tile batches, split back into one per image."""
    import torch

    features = torch.cat(parts) if len(parts) > 1 else parts[0]
    return list(features.split(counts))


def _request_images(requests: list[PreparedRequest]) -> list[list[Any]]:
    """Each request's tiles split per image (an empty list for a request without images)."""
    return [
        (
            list(request.pixel_values.split(list(request.num_patches)))
            if request.pixel_values is not None and request.num_patches
            else []
        )
        for request in requests
    ]


class VisionEncoder:
    """Projected image features of requests, for the static decode path of one model.

    Args:
        model: a loaded `InternVLForConditionalGeneration`.
        device: the model's device string ("cpu", "cuda", "cuda:N").
        dtype: the model's `torch.dtype` (pixels are converted to it on the device).
        batch_tiles: tiles per vision-tower call.
        cache: the feature cache (None: every image goes through the vision tower).
        cache_images: the first N images of each request are cache candidates.

    Failures of the model propagate unchanged (the engine codes them). Not thread-safe:
    the engine serialises its calls.
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str,
        dtype: Any,
        batch_tiles: int,
        cache: FeatureCache | None,
        cache_images: int,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.batch_tiles = batch_tiles
        self.cache = cache
        self.cache_images = cache_images if cache is not None else 0
        self._pinned: Any = None
        self._stream: Any = None
        self._copy_stream: Any = None  # host-to-device tile copies (`encode_pinned`)
        self._hash_pool: ThreadPoolExecutor | None = None

    def start(
        self, requests: list[PreparedRequest], timings: dict[str, float]
    ) -> tuple[list[list[Any]], Any]:
        """Queue the image features of `requests`; returns (features, CUDA event or None).

        On CUDA the vision tower runs on a second stream; wait for the event before using
        the features. Host copy seconds are added to `timings["transfer"]`.
        """
        if not self.device.startswith("cuda"):
            return self.image_features(requests, timings), None
        import torch

        if self._stream is None:
            self._stream = new_stream(self.device)
        stream = self._stream
        # The vision stream may reuse memory the main stream freed: order it after it.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            features = self.image_features(requests, timings)
            ready = new_event()
            ready.record(stream)
        return features, ready

    def stage(self, request: PreparedRequest) -> StagedImages:
        """`request`'s tiles in the model's dtype, pinned on CUDA, and their cache keys.

        Thread-safe (it reads only the encoder's settings), so the slot engine runs it on
        its preparation thread: the conversion, the copy and the hashing (a few
        milliseconds per request of 7 tiles) stay off the thread that queues the GPU work.
        The keys are those of the float32 tiles, as `image_features` computes them; the
        conversion rounds as the device's does, so the features are the same. A pinned
        copy is released by the allocator only after the copies queued from it are done.
        """
        import torch

        pixels = request.pixel_values
        if pixels is None or not request.num_patches:
            return StagedImages((), ())
        sizes = list(request.num_patches)
        keys = tuple(map(content_key, pixels.split(sizes)[: self.cache_images]))
        pixels = pixels.to(torch.float32).to(self.dtype).contiguous()
        if self.device.startswith("cuda"):
            pixels = pixels.pin_memory()
        return StagedImages(tuple(pixels.split(sizes)), keys)

    def image_features(
        self,
        requests: list[PreparedRequest],
        timings: dict[str, float],
        staged: Sequence[StagedImages] | None = None,
    ) -> list[list[Any]]:
        """Projected features per request, one (tiles, tokens, hidden) tensor per image.

        The first `cache_images` images of a request are looked up in the feature cache by
        content (sha256 of their tiles); every other tile goes through the vision tower in
        batches of `batch_tiles`, moved to the device from pinned memory. With `staged`
        (one `stage` result per request) the tiles are taken from there, already pinned
        and hashed, and copied to the device each straight from its own pinned memory.
        """
        if staged is None:
            split = _request_images(requests)
            candidates = [tiles for images in split for tiles in images[: self.cache_images]]
            keys = self._keys(candidates)
        else:
            split = [list(item.images) for item in staged]
            keys = iter([key for item in staged for key in item.keys])
        plan, todo, todo_keys = self._plan(split, keys)
        encode = self.encode_images if staged is None else self.encode_pinned
        computed = encode(todo, timings)
        if self.cache is not None:
            for key, value in zip(todo_keys, computed, strict=True):
                if key is not None:
                    self.cache.put(key, value)
        return [
            [value if kind == "cached" else computed[value] for kind, value in images]
            for images in plan
        ]

    def _keys(self, hashed: list[Any]) -> Iterator[str]:
        """The content keys of the cache candidates, in order."""
        if len(hashed) > 1:  # sha256 releases the GIL: hash the candidates in parallel
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(8, thread_name_prefix="feature-key")
            return iter(list(self._hash_pool.map(content_key, hashed)))
        return iter([content_key(tiles) for tiles in hashed])

    def _plan(
        self, split: list[list[Any]], keys: Iterator[str]
    ) -> tuple[list[ImagePlan], list[Any], list[str | None]]:
        """Per request its images' plan, the images to compute and their cache keys.

        An image repeated within the batch is computed once.
        """
        cache = self.cache
        plan: list[ImagePlan] = []
        todo: list[Any] = []
        todo_keys: list[str | None] = []
        pending: dict[str, int] = {}
        for images_of_request in split:
            images: ImagePlan = []
            for number, tiles in enumerate(images_of_request):
                key = next(keys) if number < self.cache_images else None
                hit = cache.get(key) if cache is not None and key is not None else None
                if hit is not None:
                    images.append(("cached", hit))
                elif key is not None and key in pending:
                    images.append(("todo", pending[key]))
                else:
                    if key is not None:
                        pending[key] = len(todo)
                    images.append(("todo", len(todo)))
                    todo.append(tiles)
                    todo_keys.append(key)
            plan.append(images)
        return plan, todo, todo_keys

    def warm_up(self, image_size: int, timings: dict[str, float]) -> None:
        """Run the vision tower once on one blank tile and once on two, results dropped.

        A compiled tower compiles on its first calls (one tile is a shape of its own, two
        or more share one dynamic compilation); the feature cache is not touched.
        """
        import torch

        with torch.inference_mode():
            for tiles in (1, 2):
                self.encode_images([torch.zeros(tiles, 3, image_size, image_size)], timings)

    def encode_images(self, images: list[Any], timings: dict[str, float]) -> list[Any]:
        """Vision tower + projector over all tiles of `images`, in fixed-size tile batches.

        Each batch is copied into pinned host memory, moved to the device and converted
        to the model's dtype on its own, and its vision work queued before the next
        batch is copied: the GPU starts after one batch of host copies, not all of them,
        and the device holds one batch of float32 pixels at a time. Returns one
        (tiles, tokens, hidden) tensor per image; host copy seconds go to
        `timings["transfer"]`.
        """
        import torch

        if not images:
            return []
        counts = [int(image.shape[0]) for image in images]
        tiles = [tile for image in images for tile in image.unbind(0)]
        host = self._host_buffer(len(tiles), tuple(images[0].shape[1:]))
        step = self.batch_tiles
        parts = []
        for begin in range(0, len(tiles), step):
            started = time.perf_counter()
            batch = host[begin : begin + step]
            torch.stack(tiles[begin : begin + step], out=batch)
            pixels = batch.to(self.device, non_blocking=True).to(self.dtype)
            timings["transfer"] += time.perf_counter() - started
            parts.append(self._tower(pixels))
        return _per_image(parts, counts)

    def encode_pinned(self, images: list[Any], timings: dict[str, float]) -> list[Any]:
        """`encode_images` for images already in pinned host memory (`stage`).

        Each image is copied to its place in one device tensor of tiles (no host copy, no
        wait for the host); the tower then runs over it in batches of `batch_tiles`. The
        device holds the call's tiles at once (7 tiles in bfloat16 are 8.4 MB; the slot
        engine's calls hold at most `vision_requests` requests). On CUDA the copies go on
        a copy stream of their own, so they overlap the work already queued on the
        current stream (decode steps) instead of holding it up: 8 requests' tiles took
        2.5 ms of a 91 ms vision call on an H200 (`bench/results/profile-kernels-h200.json`).
        """
        import torch

        if not images:
            return []
        started = time.perf_counter()
        counts = [int(image.shape[0]) for image in images]
        shape = (sum(counts), *images[0].shape[1:])
        if self.device.startswith("cuda"):
            pixels = self._upload(images, counts, shape)
        else:
            pixels = torch.cat(images) if len(images) > 1 else images[0]
        timings["transfer"] += time.perf_counter() - started
        parts = [
            self._tower(pixels[begin : begin + self.batch_tiles].to(self.dtype))
            for begin in range(0, len(pixels), self.batch_tiles)
        ]
        return _per_image(parts, counts)

    def _upload(self, images: list[Any], counts: list[int], shape: tuple[int, ...]) -> Any:
        """The pinned `images` in one device tensor, copied on the copy stream.

        The current stream waits for the copies (an event, not the host); the tensor is
        allocated on the copy stream and marked as used by the current one, so the
        allocator reuses its memory only after the vision work that reads it.
        """
        import torch

        current = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = new_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            pixels = torch.empty(shape, dtype=images[0].dtype, device=self.device)
            begin = 0
            for image, count in zip(images, counts, strict=True):
                pixels[begin : begin + count].copy_(image, non_blocking=True)
                begin += count
            copied = new_event()
            copied.record(self._copy_stream)
        current.wait_event(copied)
        pixels.record_stream(current)
        return pixels

    def _tower(self, pixels: Any) -> Any:
        """Vision tower + projector of a batch of tiles on the device (the model's dtype)."""
        config = self.model.config
        return self.model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output

    def _host_buffer(self, tiles: int, tile_shape: tuple[int, ...]) -> Any:
        """A reusable host buffer for the tiles (pinned when the model is on CUDA)."""
        import torch

        buffer = self._pinned
        if buffer is None or buffer.shape[0] < tiles or tuple(buffer.shape[1:]) != tile_shape:
            buffer = torch.empty(
                (max(tiles, 2 * (buffer.shape[0] if buffer is not None else 0)), *tile_shape),
                dtype=torch.float32,
                pin_memory=self.device.startswith("cuda"),
            )
            self._pinned = buffer
        return buffer[:tiles]
