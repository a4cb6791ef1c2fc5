"""Input pipeline of dca_jax: TFDS, official folder layouts and generated sets, one registry.

    from dca_jax import data
    inp = data.build_input(config, process_index=0, process_count=1)
    inp.info, inp.steps_per_epoch, inp.train_iter(start_step), inp.eval_iter()
    img = data.load_image_for_eval(path, transform)   # uint8 [S, W, 3] as the eval stream

`registry` lists the datasets (`registry.names(task)`, `registry.register(...)`); `spec` reads
the config once (`InputSpec`). TensorFlow is imported lazily (on the first build/load) with
every GPU hidden from it. This package never imports the model or training code. See
docs/DATA.md.
"""

from dca_jax.data.errors import DataError, DataWarning, ImageLoadError
from dca_jax.data.pipeline import build_input
from dca_jax.data.preprocess import denormalize, load_image_for_eval, normalize
from dca_jax.data.sources import DataInfo
from dca_jax.data.spec import InputSpec
from dca_jax.data.streams import Input, ReidInput

__all__ = [
    'DataError', 'DataWarning', 'ImageLoadError', 'DataInfo', 'Input', 'InputSpec', 'ReidInput',
    'build_input', 'denormalize', 'load_image_for_eval', 'normalize',
]
