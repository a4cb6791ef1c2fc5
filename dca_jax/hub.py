"""Pretrained weights by name: resolved, fetched once, verified and cached (docs/WEIGHTS.md).

`config.pretrained_model` takes

- a file path (`.npz`, `.safetensors`, `.pth`/`.pt`/`.bin`): used as it is;
- a Hugging Face Hub id, as timm names its weights: `timm/deit_tiny_patch16_224.fb_in1k`
  (the file `model.safetensors` of that repository), also spelt `hf-hub:timm/...`, with an
  optional `@revision` and `:filename` (`timm/vit_base_patch16_224.orig_in21k:pytorch_model.bin`).
  Fetched with `huggingface_hub.hf_hub_download` into its cache (`HF_HOME`, `HF_HUB_CACHE`;
  `HF_HUB_OFFLINE=1` reads the cache only), then verified: a cached LFS blob is named by the
  sha256 the Hub reported for it, a small (non-LFS) file by its git blob sha1, and the content
  must hash to that name;
- a Google ViT/AugReg `.npz` name of `KNOWN` (`imagenet21k/ViT-B_16.npz`, ...): fetched from the
  public bucket into `<HF_HOME>/dca_jax/` (resumable), verified against our checksum table
  where it holds one, else against the sha256 recorded when the file was first fetched;
- `none` (or `''`, `scratch`): random initialisation, on purpose.

`PAPER_WEIGHTS` names the weights the paper fine-tunes for each backbone; the FGVC and Re-ID
configs default to them. Backbones beyond the paper's (DINOv2, CLIP: dca_jax/backbones/) have
their registry entry's weights (`default_weights`), also in `KNOWN`. Every failure is a `WeightFetchError` with one line: what could not
be had, where the cache is, and the ways out (a local path; `tools/fetch_weights.py` run where
the network is open, e.g. on a login node before a SLURM job; `none`).

Nothing here imports huggingface_hub until a name has to be resolved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
from typing import Dict, Optional
from urllib.parse import quote

from dca_jax import backbones
from dca_jax.errors import WeightFetchError, WeightLoadError  # noqa: F401

SCRATCH_WORDS = ('', 'none', 'scratch')
CHECKPOINT_EXTENSIONS = ('.npz', '.safetensors', '.pth', '.pt', '.bin')
DEFAULT_HUB_FILE = 'model.safetensors'
GOOGLE_BUCKET_URL = 'https://storage.googleapis.com/vit_models/'
FETCH_TOOL = 'python -m tools.fetch_weights'


@dataclasses.dataclass(frozen=True)
class KnownWeights:
  """Weights we know by name: which backbone they fit and where they come from."""
  backbone: str                   # our backbone name (config.backbone)
  description: str
  normalization: str              # what the data must use: imagenet (DeiT) / inception (Google)
  url: Optional[str] = None       # Google npz: public location (else a Hub id)
  sha256: Optional[str] = None    # Google npz: our checksum, where recorded


_DEIT = 'ImageNet-1k, 224 px (DeiT, Touvron et al. 2021)'
_ORIG_IN21K = 'ImageNet-21k, 224 px (the original Google ViT release, Dosovitskiy et al. 2021)'
KNOWN: Dict[str, KnownWeights] = {
    # --- timm's copies on the Hugging Face Hub (repository ids as timm's pretrained_cfg names them)
    'timm/deit_tiny_patch16_224.fb_in1k': KnownWeights('deit_tiny', f'DeiT-T/16, {_DEIT}', 'imagenet'),
    'timm/deit_small_patch16_224.fb_in1k': KnownWeights('deit_small', f'DeiT-S/16, {_DEIT}', 'imagenet'),
    'timm/deit_base_patch16_224.fb_in1k': KnownWeights('deit_base', f'DeiT-B/16, {_DEIT}', 'imagenet'),
    'timm/vit_base_patch16_224.orig_in21k': KnownWeights(
        'vit_base', f'ViT-B/16, {_ORIG_IN21K} = imagenet21k/ViT-B_16.npz without its head',
        'inception'),
    'timm/vit_base_patch16_224.orig_in21k_ft_in1k': KnownWeights(
        'vit_base', 'ViT-B/16, ImageNet-21k fine-tuned on ImageNet-1k, 224 px (original release; '
        "TransReID's jx_vit_base_p16_224)", 'inception'),
    'timm/vit_base_patch16_224.augreg_in21k': KnownWeights(
        'vit_base', 'ViT-B/16, ImageNet-21k, 224 px (AugReg, Steiner et al. 2022)', 'inception'),
    'timm/vit_base_patch16_224.augreg_in21k_ft_in1k': KnownWeights(
        'vit_base', 'ViT-B/16, AugReg ImageNet-21k fine-tuned on ImageNet-1k, 224 px', 'inception'),
    'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k': KnownWeights(
        'vit_base', 'ViT-B/16, AugReg ImageNet-21k, fine-tuned on ImageNet-1k again by timm, 224 px',
        'inception'),
    'timm/vit_base_r50_s16_224.orig_in21k': KnownWeights(
        'r50_vit_base', f'R50+ViT-B/16 hybrid, {_ORIG_IN21K} = imagenet21k/R50+ViT-B_16.npz '
        'without its head', 'inception'),
    'timm/vit_base_r50_s16_384.orig_in21k_ft_in1k': KnownWeights(
        'r50_vit_base', 'R50+ViT-B/16 hybrid, ImageNet-21k fine-tuned on ImageNet-1k, 384 px '
        '(original release)', 'inception'),
    # --- the original Google releases (gs://vit_models), by their path in the bucket
    'imagenet21k/ViT-B_16.npz': KnownWeights(
        'vit_base', f'ViT-B/16, {_ORIG_IN21K}', 'inception',
        url=GOOGLE_BUCKET_URL + 'imagenet21k/ViT-B_16.npz'),
    'imagenet21k/R50+ViT-B_16.npz': KnownWeights(
        'r50_vit_base', f'R50+ViT-B/16 hybrid, {_ORIG_IN21K}', 'inception',
        url=GOOGLE_BUCKET_URL + 'imagenet21k/' + quote('R50+ViT-B_16.npz')),
    'augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz': KnownWeights(
        'vit_base', 'ViT-B/16, ImageNet-21k, 224 px (AugReg; timm vit_base_patch16_224.augreg_in21k)',
        'inception',
        url=GOOGLE_BUCKET_URL + 'augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'),
}

# --- the families beyond the paper's (dca_jax/backbones/): timm's copies on the Hub, each for the
# backbone its registry entry names (OpenAI's CLIP weights: the QuickGELU network they fit).
for _variant in backbones.VARIANTS.values():
  if _variant.family in ('dinov2', 'clip') and _variant.weights not in KNOWN:
    KNOWN[_variant.weights] = KnownWeights(_variant.name, _variant.description,
                                           _variant.normalization)
del _variant

# What the paper fine-tunes (docs/METHOD.md, "Training recipes"): DeiT-T/S/B on ImageNet-1k,
# ViT-B/16 and R50+ViT-B/16 on ImageNet-21k, all at 224 px (position embeddings resized to the
# fine-tuning grid). Backbones not listed (the tiny test variants) start from scratch.
PAPER_WEIGHTS: Dict[str, str] = {
    'deit_tiny': 'timm/deit_tiny_patch16_224.fb_in1k',
    'deit_small': 'timm/deit_small_patch16_224.fb_in1k',
    'deit_base': 'timm/deit_base_patch16_224.fb_in1k',
    'vit_base': 'timm/vit_base_patch16_224.orig_in21k',
    'r50_vit_base': 'timm/vit_base_r50_s16_224.orig_in21k',
}


def paper_weights(backbone: str) -> str:
  """The paper's pretrained weights for `backbone` ('none' where the paper has none)."""
  return PAPER_WEIGHTS.get(backbone, 'none')


def default_weights(backbone: str) -> str:
  """The weights a config fine-tunes for `backbone`: the paper's, else its registry entry's
  (DINOv2, CLIP), else 'none'."""
  if backbone in PAPER_WEIGHTS:
    return PAPER_WEIGHTS[backbone]
  return backbones.VARIANTS[backbone].weights if backbone in backbones.VARIANTS else 'none'


def is_scratch(value) -> bool:
  """Whether `pretrained_model` asks for random initialisation."""
  return value is None or str(value).strip().lower() in SCRATCH_WORDS


# --------------------------------------------------------------------------------------------
# What a value is
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r'(?:hf-hub:)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)'
                     r'(?:@(?P<revision>[\w./-]+?))?(?::(?P<filename>[\w./+-]+))?')


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed `pretrained_model`: kind is 'scratch', 'path', 'hub' or 'url'."""
  value: str
  kind: str
  path: str = ''                  # kind 'path'
  repo_id: str = ''               # kind 'hub'
  filename: str = ''              # kind 'hub' (file in the repository) / 'url' (cache name)
  revision: Optional[str] = None  # kind 'hub'
  known: Optional[KnownWeights] = None


def parse(value) -> Spec:
  """What `pretrained_model` names; raises WeightFetchError (one line) for an unknown name."""
  value = '' if value is None else str(value).strip()
  if is_scratch(value):
    return Spec(value, 'scratch')
  local = os.path.expanduser(value)
  if os.path.exists(local):
    return Spec(value, 'path', path=local)
  if value in KNOWN and KNOWN[value].url:
    return Spec(value, 'url', filename=value, known=KNOWN[value])
  looks_like_path = (value.startswith(('/', './', '../', '~'))
                     or (value.lower().endswith(CHECKPOINT_EXTENSIONS) and ':' not in value))
  if looks_like_path:
    return Spec(value, 'path', path=local)  # missing: read_checkpoint says so in one line
  match = _HUB_ID.fullmatch(value)
  if match:
    repo_id = match['repo']
    known = KNOWN.get(repo_id)
    return Spec(value, 'hub', repo_id=repo_id, filename=match['filename'] or DEFAULT_HUB_FILE,
                revision=match['revision'], known=known)
  raise WeightFetchError(
      f'pretrained_model {value!r}: not a file, not a Hugging Face Hub id (org/name, e.g. '
      f'{PAPER_WEIGHTS["deit_tiny"]}) and not a known name ({FETCH_TOOL} --list shows them); '
      "'none' trains from scratch")


def check_backbone(spec: Spec, backbone: str) -> None:
  """Known weights must fit the configured backbone (one line otherwise)."""
  if spec.known is None or spec.known.backbone == backbone:
    return
  raise WeightFetchError(
      f'pretrained_model {spec.value!r} holds {spec.known.backbone} weights but '
      f'config.backbone={backbone!r}: pick the backbone by config argument '
      f'(e.g. configs/cub.py:{backbone}: the default weights follow it), or set '
      f'--config.pretrained_model={default_weights(backbone)}')


def check(config) -> None:
  """`config.pretrained_model`'s form and, for known weights, their backbone; no network (the
  one validator asks: dca_jax/checks.py)."""
  check_backbone(parse(config.pretrained_model), config.backbone)


# --------------------------------------------------------------------------------------------
# Where things are cached
# --------------------------------------------------------------------------------------------

def hub_cache_dir(cache_dir: Optional[str] = None) -> str:
  """The Hugging Face Hub cache in use (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/...)."""
  if cache_dir:
    return os.path.abspath(os.path.expanduser(cache_dir))
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  return os.path.abspath(os.path.expanduser(constants.HF_HUB_CACHE))


def url_cache_dir(cache_dir: Optional[str] = None) -> str:
  """Where the Google npz files go: `dca_jax/` beside the hub cache (HF_HOME/dca_jax)."""
  return os.path.join(os.path.dirname(hub_cache_dir(cache_dir)), 'dca_jax')


def _offline_env() -> bool:
  return os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as handle:
    for chunk in iter(lambda: handle.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def git_blob_sha1(path: str) -> str:
  """git's object id of a file's content (what the Hub names a non-LFS file by)."""
  digest = hashlib.sha1(f'blob {os.path.getsize(path)}\0'.encode())
  with open(path, 'rb') as handle:
    for chunk in iter(lambda: handle.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _verify_hub_file(path: str, spec: Spec, cache: str) -> str:
  """Checks a cached Hub file against the name of its blob; returns what was verified."""
  blob = os.path.realpath(path)
  name = os.path.basename(blob)
  if re.fullmatch(r'[0-9a-f]{64}', name):
    actual, kind = file_sha256(blob), 'sha256'
  elif re.fullmatch(r'[0-9a-f]{40}', name):
    actual, kind = git_blob_sha1(blob), 'git sha1'
  else:  # no symlinks (copied into the snapshot): nothing names the expected hash
    return 'not verified: the cache holds a copy, not a blob named by its hash'
  if actual != name:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r}: checksum mismatch, {blob} has {kind} {actual} but the '
        f'Hub recorded {name} (a damaged or tampered cache file): delete it and fetch again '
        f'({FETCH_TOOL} {spec.value}), cache {cache}')
  return f'{kind} {name[:12]}... verified'


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Resolved:
  """A local file for `pretrained_model`, and where it came from (for the banner)."""
  value: str
  path: str
  source: str        # 'local file' / 'Hugging Face Hub timm/..., revision ...' / 'URL ...'
  verified: str      # what was checked
  known: Optional[KnownWeights] = None

  def describe(self) -> str:
    what = f' ({self.known.description})' if self.known else ''
    if self.source in ('local file', 'dca_jax run'):
      return f'{self.path}{what}, {self.source}'
    return f'{self.value}{what}, {self.source}, file {self.path} ({self.verified})'


def _no_network_line(spec: Spec, what: str, cache: str, reason: str) -> str:
  return (f'pretrained_model {spec.value!r}: could not fetch {what} ({reason}) and it is not in '
          f'the cache {cache}. Either pass a local file (--config.pretrained_model=/path/to/'
          f'{os.path.basename(spec.filename)}) or fill the cache where the network is open '
          f'(e.g. a login node before the SLURM job): {FETCH_TOOL} {spec.value}, with the same '
          "HF_HOME; --config.pretrained_model=none trains from scratch")


@contextlib.contextmanager
def _quiet_library():
  """huggingface_hub logs each retry as a warning; the failure is reported as one line instead.
  (Enter it after importing from huggingface_hub: its first import sets the library's level.)"""
  logger = logging.getLogger('huggingface_hub')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _resolve_hub(spec: Spec, cache_dir: Optional[str], offline: Optional[bool],
                 endpoint: Optional[str]) -> Resolved:
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r} names Hub weights, which needs huggingface_hub '
        '(pip install -r requirements.txt), or pass a local file') from None
  cache = hub_cache_dir(cache_dir)
  offline = _offline_env() if offline is None else offline
  where = f'{spec.filename} of {spec.repo_id}' + (f'@{spec.revision}' if spec.revision else '')
  try:
    with _quiet_library():
      path = hf_hub_download(
          spec.repo_id, spec.filename, revision=spec.revision, cache_dir=cache,
          local_files_only=offline, endpoint=endpoint, library_name='dca_jax')
  except hf_errors.GatedRepoError:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r}: the repository {spec.repo_id} is gated: accept its '
        'terms on the Hub and set HF_TOKEN, or pass a local file') from None
  except hf_errors.RepositoryNotFoundError:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r}: no repository {spec.repo_id} on the Hugging Face Hub '
        f'(or it is private: set HF_TOKEN); {FETCH_TOOL} --list shows the names we know') from None
  except hf_errors.RevisionNotFoundError:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r}: {spec.repo_id} has no revision {spec.revision!r}') from None
  except hf_errors.LocalEntryNotFoundError as error:  # offline, no connection, proxy, Hub down
    reason = ('HF_HUB_OFFLINE=1' if offline and _offline_env() else
              'offline' if offline else _first_line(error.__cause__ or error))
    raise WeightFetchError(_no_network_line(spec, where, cache, reason)) from None
  except hf_errors.EntryNotFoundError:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r}: {spec.repo_id} has no file {spec.filename} (name '
        f'another with {spec.repo_id}:FILE, e.g. :pytorch_model.bin)') from None
  except (OSError, ValueError) as error:  # proxy errors, disk full, bad arguments, ...
    if isinstance(error, hf_errors.HfHubHTTPError) or 'proxy' in type(error).__name__.lower():
      raise WeightFetchError(_no_network_line(spec, where, cache, _first_line(error))) from None
    raise WeightFetchError(f'pretrained_model {spec.value!r}: {_first_line(error)} '
                           f'(cache {cache})') from None
  except Exception as error:  # httpx transport errors outside the library's own handling
    raise WeightFetchError(_no_network_line(spec, where, cache, _first_line(error))) from None
  verified = _verify_hub_file(path, spec, cache)
  snapshot = re.search(r'snapshots[/\\]([0-9a-f]{40})[/\\]', path)
  revision = snapshot.group(1) if snapshot else ''
  source = f'Hugging Face Hub {spec.repo_id}' + (f' revision {revision[:12]}' if revision else '')
  return Resolved(spec.value, path, source, verified, spec.known)


def _resolve_url(spec: Spec, cache_dir: Optional[str], offline: Optional[bool]) -> Resolved:
  """A Google npz: `<HF_HOME>/dca_jax/<bucket path>`, fetched once (resumable), verified."""
  known = spec.known
  folder = url_cache_dir(cache_dir)
  path = os.path.join(folder, *spec.filename.split('/'))
  recorded = path + '.sha256'
  if not os.path.isfile(path):
    offline = _offline_env() if offline is None else offline
    if offline:
      raise WeightFetchError(_no_network_line(spec, known.url, folder,
                                              'HF_HUB_OFFLINE=1' if _offline_env() else 'offline'))
    _download_url(spec, path, folder)
  actual = file_sha256(path)
  expected = known.sha256
  if expected is None and os.path.isfile(recorded):
    with open(recorded) as handle:
      expected = handle.read().split()[0]
  if expected is not None and actual != expected:
    raise WeightFetchError(
        f'pretrained_model {spec.value!r}: checksum mismatch, {path} has sha256 {actual} but '
        f'{"our table" if known.sha256 else "the first download recorded"} {expected}: delete it '
        f'and fetch again ({FETCH_TOOL} {spec.value})')
  if expected is None:
    with open(recorded, 'w') as handle:
      handle.write(f'{actual}  {os.path.basename(path)}\n')
    verified = f'sha256 {actual[:12]}... recorded on first use (no checksum of ours for it yet)'
  elif known.sha256:
    verified = f'sha256 {actual[:12]}... verified against our table'
  else:
    verified = f'sha256 {actual[:12]}... verified against the first download'
  return Resolved(spec.value, path, f'URL {known.url}', verified, known)


def _download_url(spec: Spec, path: str, folder: str) -> None:
  """GET with resume: bytes land in `path.incomplete`, a restarted run continues from there."""
  try:
    from huggingface_hub import file_download  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightFetchError(f'pretrained_model {spec.value!r}: fetching needs huggingface_hub '
                           '(pip install -r requirements.txt), or pass a local file') from None
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = path + '.incomplete'
  try:
    with open(partial, 'ab') as handle, _quiet_library():
      file_download.http_get(spec.known.url, handle, resume_size=handle.tell(),
                             displayed_filename=os.path.basename(path))
  except Exception as error:  # pylint: disable=broad-except  (network: one line, partial kept)
    raise WeightFetchError(_no_network_line(spec, spec.known.url, folder,
                                            _first_line(error))) from None
  os.replace(partial, path)


def resolve(value, *, backbone: Optional[str] = None, cache_dir: Optional[str] = None,
            offline: Optional[bool] = None, endpoint: Optional[str] = None) -> Optional[Resolved]:
  """`pretrained_model` -> a verified local file (None for scratch).

  Args:
    value: a path, a Hub id or a known name (see the module doc), or 'none'.
    backbone: config.backbone; known weights of another backbone are refused.
    cache_dir: the Hub cache; None = huggingface_hub's (HF_HUB_CACHE / HF_HOME).
    offline: True = the cache only; None = HF_HUB_OFFLINE decides.
    endpoint: the Hub's address; None = HF_ENDPOINT / huggingface.co.
  Raises WeightFetchError with one line.
  """
  spec = parse(value)
  if spec.kind == 'scratch':
    return None
  if backbone is not None:
    check_backbone(spec, backbone)
  if spec.kind == 'path':
    if os.path.isdir(spec.path):  # a dca_jax run (weights.read_run says which step)
      return Resolved(spec.value, spec.path, 'dca_jax run', 'not checked', spec.known)
    if not os.path.isfile(spec.path):
      raise WeightFetchError(f'{spec.path}: no such checkpoint file')
    return Resolved(spec.value, spec.path, 'local file', 'not checked', spec.known)
  if spec.kind == 'url':
    return _resolve_url(spec, cache_dir, offline)
  return _resolve_hub(spec, cache_dir, offline, endpoint)


def banner_line(value, loaded: Optional[str]) -> str:
  """'Pretrained weights: ...' for the start banner; `loaded`: what the train state's init
  loaded in words (train_step.Built.pretrained), None when nothing was (a resumed run)."""
  if is_scratch(value):
    return 'Pretrained weights: none (random initialisation: pretrained_model=none)'
  if loaded is not None:
    return f'Pretrained weights: {loaded}'
  return f'Pretrained weights: {value} not loaded (the resumed checkpoint holds the weights)'
