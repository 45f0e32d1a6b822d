"""Zero-shot classifier and metrics, retrieval recall, linear probe, prompt registry: exact cases."""
import numpy as np
import pytest

from clip_jax.evaluate import registry
from clip_jax.evaluate.linear_probe import fit_logistic_regression, linear_probe, objective
from clip_jax.evaluate.retrieval import retrieval_metrics
from clip_jax.evaluate.zeroshot import (ClassifierCache, build_classifier, classification_metrics,
                                        topk_hits, zeroshot_metrics)

# A 3-class world in 3-D: every prompt has a hand-picked embedding.
PROMPT_EMBEDDINGS = {
    "a cat.": (2.0, 0.0, 0.0), "the cat.": (0.0, 3.0, 0.0),   # -> (1, 1, 0) / sqrt(2)
    "a dog.": (0.0, 0.0, 5.0), "the dog.": (0.0, 0.0, 1.0),   # -> (0, 0, 1)
    "a bird.": (7.0, 0.0, 0.0), "the bird.": (1.0, 0.0, 0.0),  # -> (1, 0, 0)
}
CLASSNAMES = ["cat", "dog", "bird"]
TEMPLATES = ["a {}.", "the {}."]


def _fake_text_tower(embeddings):
  texts = list(embeddings)
  table = np.asarray([embeddings[t] for t in texts], np.float32)
  tokenize = lambda batch: np.asarray([[texts.index(t)] for t in batch], np.int32)
  encode = lambda tokens: table[np.asarray(tokens)[:, 0]]
  return encode, tokenize


def _classifier():
  encode, tokenize = _fake_text_tower(PROMPT_EMBEDDINGS)
  return build_classifier(encode, CLASSNAMES, TEMPLATES, tokenize_fn=tokenize)


def test_classifier_averages_normalised_prompt_embeddings():
  classifier = _classifier()
  s = 1 / np.sqrt(2)
  # Normalising before averaging matters: the raw mean of cat's prompts points along (2, 3, 0).
  expected = np.asarray([[s, s, 0], [0, 0, 1], [1, 0, 0]], np.float32).T
  np.testing.assert_allclose(classifier, expected, atol=1e-7)
  assert classifier.shape == (3, 3) and classifier.dtype == np.float32


def test_classifier_averages_over_synonyms_and_templates():
  # FER2013 style: a class with two names averages all names x templates.
  embeddings = {"a happy.": (1.0, 0, 0), "the happy.": (1.0, 0, 0),
                "a smiling.": (0, 4.0, 0), "the smiling.": (0, 2.0, 0),
                "a sad.": (0, 0, 1.0), "the sad.": (0, 0, 3.0)}
  encode, tokenize = _fake_text_tower(embeddings)
  classifier = build_classifier(encode, [["happy", "smiling"], ["sad"]], TEMPLATES,
                                tokenize_fn=tokenize)
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(classifier[:, 0], [s, s, 0], atol=1e-7)
  np.testing.assert_allclose(classifier[:, 1], [0, 0, 1], atol=1e-7)


def test_zeroshot_metrics_hand_made_case():
  images = np.asarray([
      (1, 1, 0),      # cat   -> cat  (right)
      (1, 0.2, 0),    # cat   -> bird (wrong; cat second)
      (0, 0, 1),      # dog   -> dog
      (0.1, 0, 1),    # dog   -> dog
      (0, 0.1, 1),    # dog   -> dog
      (3, 0, 0),      # bird  -> bird (norm does not matter)
      (0, 1, 0.1),    # bird  -> cat  (wrong; bird last)
  ], np.float32)
  labels = np.asarray([0, 0, 1, 1, 1, 2, 2])
  metrics = zeroshot_metrics(images, _classifier(), labels)
  assert metrics["top1"] == pytest.approx(5 / 7, abs=1e-12)
  assert metrics["top5"] == 1.0  # top-5 capped at the 3 classes
  assert metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 3 / 3 + 1 / 2) / 3, abs=1e-12)
  logits = images / np.linalg.norm(images, axis=1, keepdims=True) @ _classifier()
  assert topk_hits(logits, labels, 2).tolist() == [True, True, True, True, True, True, False]


def test_ties_do_not_reward_a_collapsed_model():
  # Identical logits: argmax picks class 0 only, so accuracy is chance, not 100%.
  metrics = classification_metrics(np.zeros((6, 3)), np.asarray([0, 1, 2, 0, 1, 2]))
  assert metrics["top1"] == pytest.approx(1 / 3)
  assert metrics["mean_per_class_recall"] == pytest.approx(1 / 3)


def test_mean_per_class_recall_matches_a_confusion_matrix():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 7))
  labels = rng.integers(0, 6, 300)  # class 6 never appears: it is left out, as sklearn does
  pred = logits.argmax(1)
  confusion = np.zeros((7, 7))
  np.add.at(confusion, (labels, pred), 1)
  rows = confusion.sum(1) > 0
  expected = np.mean(np.diag(confusion)[rows] / confusion.sum(1)[rows])
  top5 = np.mean([l in np.argsort(-row)[:5] for row, l in zip(logits, labels)])
  metrics = classification_metrics(logits, labels)
  assert metrics["mean_per_class_recall"] == pytest.approx(expected, abs=1e-12)
  assert metrics["top5"] == pytest.approx(top5, abs=1e-12)
  assert metrics["top1"] == pytest.approx(np.mean(pred == labels), abs=1e-12)


def test_bad_labels_and_templates_are_clear_errors():
  with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
    classification_metrics(np.zeros((2, 3)), np.asarray([0, 3]))
  encode, tokenize = _fake_text_tower(PROMPT_EMBEDDINGS)
  with pytest.raises(ValueError, match="placeholder"):
    build_classifier(encode, CLASSNAMES, ["a photo"], tokenize_fn=tokenize)


def test_classifier_cache_memory_disk_and_prompt_key(tmp_path):
  calls = []

  def build():
    calls.append(1)
    return np.eye(3, dtype=np.float32)

  cache = ClassifierCache(tmp_path)
  first = cache.get_or_build("ckpt@100", "cifar10", CLASSNAMES, TEMPLATES, build)
  cache.get_or_build("ckpt@100", "cifar10", CLASSNAMES, TEMPLATES, build)
  assert len(calls) == 1
  # A fresh cache on the same dir reads the file instead of rebuilding.
  again = ClassifierCache(tmp_path).get_or_build("ckpt@100", "cifar10", CLASSNAMES, TEMPLATES, build)
  assert len(calls) == 1 and np.array_equal(first, again)
  # Another checkpoint, dataset or prompt set is another entry.
  cache.get_or_build("ckpt@200", "cifar10", CLASSNAMES, TEMPLATES, build)
  cache.get_or_build("ckpt@100", "cifar10", CLASSNAMES, TEMPLATES[:1], build)
  assert len(calls) == 3


# ---- retrieval

def test_retrieval_hand_made_case():
  images = np.eye(3)
  texts = np.asarray([
      (1, 0, 0),        # image 0: its image ranks 1st
      (0.2, 0.9, 0.3),  # image 0: images 1, 2 score higher -> 3rd
      (0.5, 0.3, 0.8),  # image 1: 2, 0 higher -> 3rd
      (0.6, 0.4, 0.1),  # image 1: 0 higher -> 2nd
      (0, 0.1, 1),      # image 2: 1st
  ])
  text_to_image = np.asarray([0, 0, 1, 1, 2])
  metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 3))
  assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 5)
  assert metrics["image_retrieval_recall@2"] == pytest.approx(3 / 5)
  assert metrics["image_retrieval_recall@3"] == 1.0
  # Image 1's texts in order: t1 .93, t3 .55, t2 .30 -> its best caption t3 is 2nd.
  assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
  assert metrics["text_retrieval_recall@2"] == 1.0
  default = retrieval_metrics(images, texts, text_to_image)
  assert sorted(default) == sorted(f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                   for k in (1, 5, 10))


def test_retrieval_matches_brute_force_with_chunks():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(40, 6))
  text_to_image = np.repeat(np.arange(40), rng.integers(1, 6, 40))
  texts = images[text_to_image] + 1.5 * rng.normal(size=(len(text_to_image), 6))
  metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk_size=7)
  n_i = images / np.linalg.norm(images, axis=1, keepdims=True)
  n_t = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  scores = n_t @ n_i.T
  for k in (1, 5, 10):
    t2i = np.mean([t2 in np.argsort(-row, kind="stable")[:k]
                   for row, t2 in zip(scores, text_to_image)])
    i2t = np.mean([np.any(text_to_image[np.argsort(-scores[:, i], kind="stable")[:k]] == i)
                   for i in range(40)])
    assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-12)
    assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-12)
  assert 0 < metrics["image_retrieval_recall@1"] < metrics["image_retrieval_recall@10"] < 1


def test_retrieval_rejects_images_without_captions():
  with pytest.raises(ValueError, match="image 2 has no caption"):
    retrieval_metrics(np.eye(3), np.eye(3)[:2], np.asarray([0, 1]))


# ---- linear probe

def test_logistic_regression_matches_torch_lbfgs():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  y = rng.integers(0, 3, 120)
  w, b = fit_logistic_regression(x, y, 3, 1e-2)
  xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
  tw = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
  tb = torch.zeros(3, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.LBFGS([tw, tb], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                          line_search_fn="strong_wolfe")

  def closure():
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(xt @ tw + tb, yt) + 0.5e-2 * (tw * tw).sum()
    loss.backward()
    return loss

  opt.step(closure)
  np.testing.assert_allclose(w, tw.detach().numpy(), atol=1e-4)
  np.testing.assert_allclose(b, tb.detach().numpy(), atol=1e-4)
  assert float(objective((w, b), x, y, 1e-2)) == pytest.approx(float(closure().detach()), abs=1e-6)


def test_linear_probe_separable_features_reach_100_percent():
  rng = np.random.default_rng(0)
  centres = 3 * np.eye(5, 8)
  y_train, y_test = rng.integers(0, 5, 150), rng.integers(0, 5, 50)
  x_train = centres[y_train] + 0.3 * rng.normal(size=(150, 8))
  x_test = centres[y_test] + 0.3 * rng.normal(size=(50, 8))
  metrics = linear_probe(x_train, y_train, x_test, y_test, l2_grid=(1e-4, 1e-2, 1e2))
  assert metrics["lp_acc1"] == 1.0 and metrics["lp_mean_per_class_recall"] == 1.0
  assert metrics["val_acc1"] == 1.0
  # A crushing penalty flattens the logits to the class priors: it cannot win the sweep.
  assert metrics["best_l2"] < 1e2


def test_linear_probe_on_noise_labels_stays_near_chance():
  # Labels that are pure noise: whatever the sweep picks, test accuracy stays near chance.
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(200, 20)), rng.integers(0, 2, 200)
  metrics = linear_probe(x[:150], y[:150], x[150:], y[150:], l2_grid=(1e-6, 1e-1, 1e1))
  assert metrics["best_l2"] in (1e-6, 1e-1, 1e1)
  assert 0.2 < metrics["lp_acc1"] < 0.8


# ---- registry

def test_registry_has_imagenet_its_200_class_variants_and_the_26_datasets():
  known = registry.known_datasets()
  assert len(known) == 30 and "synthetic" in known and "imagenet" in known
  assert {"imageneta", "imagenetr"} <= set(known)
  imagenet = registry.get_prompts("imagenet2012")
  assert len(imagenet.classnames) == 1000 and len(imagenet.templates) == 80
  fer = registry.get_prompts("fer2013")
  assert fer.classnames[3] == ("happy", "smiling") and len(fer.classnames) == 7
  assert len(registry.get_prompts("cifar100").classnames) == 100
  assert registry.resolve("eurosat/rgb") == "eurosat"
  assert registry.resolve("oxford_iiit_pet") == "oxfordpets"
  assert registry.resolve("imagenet_v2/matched-frequency") == "imagenet"


def test_registry_synthetic_prompts_come_from_the_data_module():
  from clip_jax.data import synthetic
  prompts = registry.get_prompts("synthetic")
  assert list(prompts.classnames) == synthetic.CLASSNAMES
  assert list(prompts.templates) == synthetic.TEMPLATES


def test_registry_unknown_dataset_lists_known_ones():
  with pytest.raises(ValueError, match=r"no zero-shot prompts for dataset 'coco'.*cifar10.*imagenet"):
    registry.resolve("coco")


def test_align_classnames_by_name_or_position():
  prompts = registry.get_prompts("oxfordpets").classnames
  # TFDS oxford_iiit_pet sorts case-insensitively; prompts.md sorts uppercase first.
  tfds_names = sorted((c.replace(" ", "_") for c in prompts), key=str.lower)
  aligned = registry.align_classnames(prompts, tfds_names)
  assert aligned[:3] == ["Abyssinian", "american bulldog", "american pit bull terrier"]
  assert aligned != list(prompts) and sorted(aligned) == sorted(prompts)
  cifar = registry.get_prompts("cifar10").classnames
  assert registry.align_classnames(cifar, [str(i) for i in range(10)]) == list(cifar)
  with pytest.raises(ValueError, match="has 3 classes but the prompt registry has 10"):
    registry.align_classnames(cifar, ["a", "b", "c"])
