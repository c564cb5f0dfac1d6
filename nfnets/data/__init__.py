"""The host input pipeline: TFDS (array_record) and image folders, deterministic and resumable.

  options.py        DataOptions (every `config.data` key and its default), the RandAugment level
  datasets.py       the entry points: dataset_info, train_iterator, eval_iterator
  pipeline.py       tf.data iterators (TensorFlow is imported here, and hides the GPUs from it)
  preprocessing.py  decode, crop, flip, resize (TF stateless ops); eval protocols
  sources.py        random-access sources: TFDS array_record, folders; ImageNet split aliases
  folder.py  mnist5k.py  prepare_imagenet.py   the folder index, the offline digits, ImageNet
  synthetic.py      data.name='fake' (numpy only)
  normalization.py  the ImageNet mean/std, shared with the device-side augmentation

Importing `nfnets.data` itself is cheap: TensorFlow is loaded only when a real (non-'fake')
data set is opened. MixUp/CutMix and RandAugment run on the accelerator (`nfnets.augment`).
"""
