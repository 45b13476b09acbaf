"""Captions and images as data: reading datasets, the corpus, the vocabulary, images and feature stores.

- :mod:`~captioner.data.text`: the tokenizer, the vocabulary, atomic JSON/text writes;
- :mod:`~captioner.data.corpus`: the corpus (images, captions, splits) and its validation report;
- :mod:`~captioner.data.readers`: the readers of the dataset formats, and :func:`read_corpus`;
- :mod:`~captioner.data.prepare`: `captioner prepare` (corpus.json, vocab.json, report.json);
- :mod:`~captioner.data.images`: the one safe image loader, and which files are images;
- :mod:`~captioner.data.features`: the feature store on disk (filled by :mod:`captioner.encoders.extract`);
- :mod:`~captioner.data.captions`: one split's captions with their feature rows, for training and scoring;
- :mod:`~captioner.data.synthetic`: the synthetic shapes dataset.
"""
