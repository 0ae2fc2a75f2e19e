"""Guesslang's programming-language detector, called through TensorFlow directly.

The `guesslang-experimental` package ships Guesslang's trained model (a TensorFlow SavedModel) but
its `Guess` class no longer imports on current TensorFlow (tf.estimator is gone). Prediction needs
only the SavedModel, so we load it ourselves, call its serving signature on batches of texts, and
keep Guesslang's answer rules: no answer for blank text, and "not sure" (None) unless the best
language's probability exceeds the mean plus two standard deviations of all probabilities.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from utils.errors import CodeUpError
from utils.logs import TENSORFLOW_IMPORT_NOTICES, native_notices_dropped, progress_bars_wanted


def guesslang_data_dir() -> Path:
    """The package's data folder, found without importing the package (its __init__ fails)."""
    spec = importlib.util.find_spec("guesslang")
    if spec is None or not spec.submodule_search_locations:
        raise CodeUpError("Guesslang's model is missing: pip install guesslang-experimental==2.2.3")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class Guesslang:
    """Batched Guesslang: `language_names(texts)` gives a language name (or None) per text."""

    def __init__(self, model_dir: str | None = None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's startup chatter (errors still raise)
        with native_notices_dropped(TENSORFLOW_IMPORT_NOTICES):  # what that setting no longer reaches
            import tensorflow as tf

        data_dir = guesslang_data_dir()
        self._tf = tf
        self._predict = tf.saved_model.load(str(model_dir or data_dir / "model")).signatures["serving_default"]
        name_by_extension = {ext: name for name, ext in json.loads((data_dir / "languages.json").read_text()).items()}
        classes = self._predict(tf.constant([""]))["classes"][0].numpy()
        # The model returns scores in a fixed class order; map each class to its language name once.
        self.languages = [name_by_extension[ext.decode()] for ext in classes]

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Probabilities, shape (len(texts), len(self.languages)), columns in self.languages order."""
        return self._predict(self._tf.constant(list(texts)))["scores"].numpy()

    def detect(self, texts, top_k: int = 1, batch_size: int = 64, progress: bool = False):
        """For each text: (Guesslang's answer or None for "not sure", its top_k languages by probability).
        Blank texts get (None, [])."""
        texts = list(texts)
        results: list[tuple[str | None, list[str]]] = [(None, [])] * len(texts)
        todo = [i for i, text in enumerate(texts) if text.strip()]
        bar = tqdm(total=len(todo), desc="Guesslang", unit="text", disable=not (progress and progress_bars_wanted()))
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for i, scores in zip(batch, self.probabilities([texts[i] for i in batch])):
                top = [self.languages[j] for j in np.argsort(-scores)[:top_k]]
                results[i] = (self._reliable_name(scores), top)
            bar.update(len(batch))
        bar.close()
        return results

    def language_names(self, texts, batch_size: int = 64, progress: bool = False) -> list[str | None]:
        return [name for name, _ in self.detect(texts, batch_size=batch_size, progress=progress)]

    def _reliable_name(self, scores: np.ndarray) -> str | None:
        # Guesslang's rule; ddof=1 matches its statistics.stdev.
        if scores.max() > scores.mean() + 2 * scores.std(ddof=1):
            return self.languages[int(scores.argmax())]
        return None
