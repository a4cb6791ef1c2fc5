"""Pretrained weights by name (dca_jax/hub.py), with no network.

A real Hugging Face Hub cache is laid out on disk by the test, in the library's own layout
(`models--org--name/{blobs,snapshots/<commit>,refs/main}`, LFS blobs named by their sha256,
small files by their git sha1, snapshot entries relative symlinks), populated from the committed
tiny timm fixtures; `huggingface_hub.scan_cache_dir` (the library's own cache reader) checks the
layout. Names are then resolved through `hf_hub_download` itself, offline (HF_HUB_OFFLINE=1 in
a subprocess, `local_files_only` in process) or against an endpoint that refuses connections.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import checks, hub
from dca_jax import weights as W
from dca_jax.models import vit

huggingface_hub = pytest.importorskip('huggingface_hub')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, 'tests', 'fixtures')
COMMIT = hashlib.sha1(b'dca_jax test snapshot').hexdigest()
DEIT = hub.PAPER_WEIGHTS['deit_tiny']        # the real name, filled with the tiny fixture
VIT_CONFIG = vit.ViTConfig(width=48, depth=2, num_heads=2, mlp_dim=192, patch_size=8)
CONFIG_JSON = json.dumps({'architecture': 'vit_tiny_fixture', 'num_classes': 10}).encode()
REFUSED = 'http://127.0.0.1:9'                # loopback port with no server: connection refused


def _git_sha1(data: bytes) -> str:
  return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def lay_out_repo(cache, repo_id, files):
  """One repository in the Hub cache layout; `files` maps a file name to (bytes, is_lfs)."""
  folder = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
  os.makedirs(os.path.join(folder, 'blobs'), exist_ok=True)
  os.makedirs(os.path.join(folder, 'refs'), exist_ok=True)
  snapshot = os.path.join(folder, 'snapshots', COMMIT)
  os.makedirs(snapshot, exist_ok=True)
  for filename, (data, lfs) in files.items():
    blob = hashlib.sha256(data).hexdigest() if lfs else _git_sha1(data)
    with open(os.path.join(folder, 'blobs', blob), 'wb') as f:
      f.write(data)
    os.symlink(os.path.join('..', '..', 'blobs', blob), os.path.join(snapshot, filename))
  with open(os.path.join(folder, 'refs', 'main'), 'w') as f:
    f.write(COMMIT)
  return folder


def _read(name):
  with open(os.path.join(FIX, name), 'rb') as f:
    return f.read()


@pytest.fixture
def hf_home(tmp_path):
  """HF_HOME with a hub cache holding DeiT-T's name (tiny vit fixture + a config.json) and
  the hybrid fixture under the hybrid's name."""
  cache = os.path.join(tmp_path, 'hub')
  lay_out_repo(cache, DEIT, {'model.safetensors': (_read('vit.safetensors'), True),
                             'config.json': (CONFIG_JSON, False)})
  lay_out_repo(cache, hub.PAPER_WEIGHTS['r50_vit_base'],
               {'model.safetensors': (_read('hybrid.safetensors'), True)})
  return str(tmp_path)


def test_the_laid_out_cache_is_the_librarys_layout(hf_home):
  info = huggingface_hub.scan_cache_dir(os.path.join(hf_home, 'hub'))
  assert not info.warnings, info.warnings
  repos = {repo.repo_id: repo for repo in info.repos}
  assert set(repos) == {DEIT, hub.PAPER_WEIGHTS['r50_vit_base']}
  (revision,) = repos[DEIT].revisions
  assert revision.commit_hash == COMMIT and revision.refs == {'main'}
  assert {f.file_name for f in revision.files} == {'model.safetensors', 'config.json'}
  cached = huggingface_hub.try_to_load_from_cache(DEIT, 'model.safetensors',
                                                  cache_dir=os.path.join(hf_home, 'hub'))
  assert cached == os.path.join(hf_home, 'hub', f'models--timm--{DEIT[5:]}', 'snapshots', COMMIT,
                                'model.safetensors')


def test_hub_name_resolves_offline_verified_and_loads_with_timm_parity(hf_home):
  cache = os.path.join(hf_home, 'hub')
  resolved = hub.resolve(DEIT, backbone='deit_tiny', cache_dir=cache, offline=True)
  assert resolved.path.startswith(os.path.join(cache, f'models--timm--{DEIT[5:]}', 'snapshots'))
  sha = hashlib.sha256(_read('vit.safetensors')).hexdigest()
  assert os.path.basename(os.path.realpath(resolved.path)) == sha
  assert resolved.verified == f'sha256 {sha[:12]}... verified'
  assert f'revision {COMMIT[:12]}' in resolved.describe() and 'DeiT-T/16' in resolved.describe()
  # the strict importer on the resolved file, at 64 px (4x4 -> 8x8 grid): timm's logits
  model = vit.VisionTransformer(VIT_CONFIG, num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  params, report = W.load_pretrained(resolved.path, params, VIT_CONFIG, load_head=True)
  assert not report.newly_initialized and not report.unused
  with np.load(os.path.join(FIX, 'expected.npz')) as expected:
    images = np.transpose(expected['inputs_64'], (0, 2, 3, 1))
    logits = model.apply({'params': params}, images)
    np.testing.assert_allclose(logits, expected['vit_logits_64'], atol=1e-4, rtol=0)
  # a small (non-LFS) file is verified by its git sha1
  small = hub.resolve(f'{DEIT}:config.json', cache_dir=cache, offline=True)
  assert small.verified == f'git sha1 {_git_sha1(CONFIG_JSON)[:12]}... verified'


def test_cached_file_is_used_when_the_hub_cannot_be_reached(hf_home):
  """Online mode with the endpoint refusing connections: the library falls back to the cache."""
  resolved = hub.resolve(hub.PAPER_WEIGHTS['r50_vit_base'], backbone='r50_vit_base',
                         cache_dir=os.path.join(hf_home, 'hub'), offline=False, endpoint=REFUSED)
  assert W.read_checkpoint(resolved.path).keys() == W.read_checkpoint(
      os.path.join(FIX, 'hybrid.safetensors')).keys()


def _fetch_tool(hf_home, *names):
  env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE='1')
  env.pop('HF_HUB_CACHE', None)
  return subprocess.run([sys.executable, '-m', 'tools.fetch_weights', *names], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def test_hf_hub_offline_env_reads_the_cache_under_hf_home(hf_home):
  r = _fetch_tool(hf_home, DEIT)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f'{DEIT}: {os.path.join(hf_home, "hub", "models--timm--")}')
  assert 'verified' in r.stdout and not r.stderr


def test_offline_and_not_cached_is_one_line_with_the_ways_out(hf_home):
  name = hub.PAPER_WEIGHTS['vit_base']
  r = _fetch_tool(hf_home, name)
  assert r.returncode == 1
  (line,) = r.stderr.strip().splitlines()
  assert line.startswith(f"error: pretrained_model '{name}': could not fetch model.safetensors")
  assert 'HF_HUB_OFFLINE=1' in line and os.path.join(hf_home, 'hub') in line
  assert '--config.pretrained_model=/path/to/' in line
  assert f'python -m tools.fetch_weights {name}' in line


def test_checksum_mismatch_is_one_line(hf_home):
  cache = os.path.join(hf_home, 'hub')
  path = hub.resolve(DEIT, cache_dir=cache, offline=True).path
  blob = os.path.realpath(path)
  data = bytearray(_read('vit.safetensors'))
  data[-1] ^= 0xFF                               # one flipped bit pattern in the last tensor
  with open(blob, 'wb') as f:
    f.write(data)
  with pytest.raises(hub.WeightFetchError) as error:
    hub.resolve(DEIT, cache_dir=cache, offline=True)
  line = str(error.value)
  assert '\n' not in line and 'checksum mismatch' in line
  assert hashlib.sha256(bytes(data)).hexdigest() in line and os.path.basename(blob) in line
  small = os.path.realpath(hub.resolve(f'{DEIT}:config.json', cache_dir=cache, offline=True).path)
  with open(small, 'ab') as f:
    f.write(b' ')
  with pytest.raises(hub.WeightFetchError, match='checksum mismatch.*git sha1'):
    hub.resolve(f'{DEIT}:config.json', cache_dir=cache, offline=True)


def test_missing_file_unknown_name_and_wrong_backbone_are_one_line(hf_home, tmp_path):
  cache = os.path.join(hf_home, 'hub')
  cases = [
      (f'{DEIT}:pytorch_model.bin', None, 'could not fetch pytorch_model.bin of ' + DEIT),
      (str(tmp_path / 'nowhere' / 'deit.safetensors'), None, 'no such checkpoint file'),
      ('deit_tny', None, "'deit_tny': not a file, not a Hugging Face Hub id"),
      ('not a name!', None, 'not a known name'),
      (DEIT, 'vit_base', f"holds deit_tiny weights but config.backbone='vit_base'"),
  ]
  for value, backbone, message in cases:
    with pytest.raises(hub.WeightFetchError) as error:
      hub.resolve(value, backbone=backbone, cache_dir=cache, offline=True)
    assert message in str(error.value) and '\n' not in str(error.value), str(error.value)
    assert isinstance(error.value, ValueError)    # main.py: "error: <line>", exit status 1


def test_google_npz_name_cached_verified_by_the_first_download(hf_home):
  cache = os.path.join(hf_home, 'hub')
  name = 'imagenet21k/ViT-B_16.npz'
  with pytest.raises(hub.WeightFetchError, match='could not fetch https://storage.googleapis.com/'
                     'vit_models/imagenet21k/ViT-B_16.npz .offline. and it is not in the cache'):
    hub.resolve(name, backbone='vit_base', cache_dir=cache, offline=True)
  target = os.path.join(hub.url_cache_dir(cache), 'imagenet21k', 'ViT-B_16.npz')
  assert target == os.path.join(hf_home, 'dca_jax', 'imagenet21k', 'ViT-B_16.npz')
  os.makedirs(os.path.dirname(target))
  with open(target, 'wb') as f:
    f.write(_read('vit.npz'))              # as a finished download would have left it
  first = hub.resolve(name, backbone='vit_base', cache_dir=cache, offline=True)
  sha = hashlib.sha256(_read('vit.npz')).hexdigest()
  assert first.path == target and first.verified.startswith(f'sha256 {sha[:12]}... recorded')
  again = hub.resolve(name, backbone='vit_base', cache_dir=cache, offline=True)
  assert again.verified == f'sha256 {sha[:12]}... verified against the first download'
  with open(target, 'ab') as f:
    f.write(b'\0')
  with pytest.raises(hub.WeightFetchError, match=f'checksum mismatch.*recorded {sha}'):
    hub.resolve(name, cache_dir=cache, offline=True)


class _RangeServer:
  """A loopback HTTP server of one file that honours `Range: bytes=N-` (as the bucket does)."""

  def __init__(self, data: bytes):
    import http.server  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.ranges = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # pylint: disable=invalid-name
        start = 0
        if self.headers.get('Range'):
          server.ranges.append(self.headers['Range'])
          start = int(self.headers['Range'].split('=')[1].split('-')[0])
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(data) - start))
        if start:
          self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        self.wfile.write(data[start:])

      def log_message(self, *args):
        pass

    self.httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/ViT-B_16.npz'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def test_npz_download_resumes_a_partial_file(tmp_path, monkeypatch):
  """The npz fetcher (huggingface_hub's http_get) continues FILE.incomplete with a Range
  request, from a loopback server, and the finished file is verified and recorded."""
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  data = _read('vit.npz')
  server = _RangeServer(data)
  try:
    known = hub.KnownWeights('vit_base', 'test', 'inception', url=server.url)
    spec = hub.Spec('imagenet21k/ViT-B_16.npz', 'url', filename='imagenet21k/ViT-B_16.npz',
                    known=known)
    cache = str(tmp_path / 'hub')
    target = os.path.join(hub.url_cache_dir(cache), 'imagenet21k', 'ViT-B_16.npz')
    os.makedirs(os.path.dirname(target))
    half = len(data) // 2
    with open(target + '.incomplete', 'wb') as f:
      f.write(data[:half])                     # what an interrupted run left
    resolved = hub._resolve_url(spec, cache, offline=False)  # pylint: disable=protected-access
  finally:
    server.close()
  assert server.ranges == [f'bytes={half}-']
  with open(resolved.path, 'rb') as f:
    assert f.read() == data
  assert not os.path.exists(target + '.incomplete')
  assert resolved.verified.startswith(f'sha256 {hashlib.sha256(data).hexdigest()[:12]}... recorded')


def test_parse_forms():
  spec = hub.parse('hf-hub:timm/vit_base_patch16_224.orig_in21k@main:pytorch_model.bin')
  assert (spec.kind, spec.repo_id, spec.revision, spec.filename) == (
      'hub', 'timm/vit_base_patch16_224.orig_in21k', 'main', 'pytorch_model.bin')
  assert spec.known.backbone == 'vit_base'
  assert hub.parse('org/some-model').filename == 'model.safetensors'
  assert hub.parse('org/some-model').known is None
  assert hub.parse('weights/deit.safetensors').kind == 'path'
  assert hub.parse('imagenet21k/R50+ViT-B_16.npz').known.url.endswith('imagenet21k/R50%2BViT-B_16.npz')
  for word in ('', 'none', 'None', 'scratch'):
    assert hub.parse(word).kind == 'scratch' and hub.resolve(word) is None


def _load_config(name, arg=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f'config_{name}', os.path.join(ROOT, 'configs',
                                                                               f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name', ['cub', 'cars', 'aircraft', 'market1501', 'msmt17', 'veri776',
                                  'dukemtmc'])
def test_configs_name_the_papers_weights_and_their_normalisation(name):
  from dca_jax import config_lib  # pylint: disable=g-import-not-at-top
  paper = {'deit_tiny': 'DeiT-T', 'deit_small': 'DeiT-S', 'deit_base': 'DeiT-B',
           'vit_base': 'ViT-B/16, ImageNet-21k', 'r50_vit_base': 'R50+ViT-B/16 hybrid, ImageNet-21k'}
  for backbone, words in paper.items():
    config = _load_config(name, backbone)
    checks.checked(config)
    spec = hub.parse(config.pretrained_model)
    assert spec.kind == 'hub' and spec.repo_id.startswith('timm/'), config.pretrained_model
    assert spec.known.backbone == backbone and words in spec.known.description
    # the data must be normalised as the weights were trained
    assert spec.known.normalization == config_lib.resolve_normalization(config)


def test_a_backbone_override_without_its_weights_fails_validation():
  config = _load_config('cub')
  config.backbone = 'vit_base'                  # --config.backbone=vit_base: DeiT-T weights left
  with pytest.raises(ValueError, match="holds deit_tiny weights but config.backbone='vit_base'.*"
                     'pretrained_model=timm/vit_base_patch16_224.orig_in21k'):
    checks.checked(config)


def test_the_demos_train_from_scratch():
  assert hub.is_scratch(_load_config('demo').pretrained_model)
  assert hub.is_scratch(_load_config('reid_demo').pretrained_model)


@pytest.mark.slow
def test_training_loads_by_name_says_so_and_a_resumed_run_does_not_fetch(hf_home, tmp_path,
                                                                           capsys, monkeypatch):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top

  from dca_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', os.path.join(hf_home, 'hub'))  # = HF_HOME's
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  config = tiny_config(max_steps=2, save_every_steps=2, pretrained_model=DEIT)
  config.backbone_overrides.update(dict(width=48, mlp_dim=192))  # the fixture's shapes
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  (line,) = [l for l in out.splitlines() if l.startswith('Pretrained weights:')]
  assert line.startswith(f'Pretrained weights: {DEIT} (DeiT-T/16, ImageNet-1k')
  assert f'Hugging Face Hub {DEIT} revision {COMMIT[:12]}' in line and 'sha256' in line
  assert 'verified' in line and 'GLCA from block_1' in line
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(hf_home, 'hub'))  # a fetch would now fail
  config.max_steps = 3
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f'pretrained_model {DEIT} is not loaded nor fetched' in out and 'Resumed from' in out
  assert f'Pretrained weights: {DEIT} not loaded (the resumed checkpoint holds the weights)' in out
