"""Domain tags: keywords count as whole words with punctuation split off, and only when frequent enough."""

from data.label import LabelConfig, domain_tags


def test_keywords_with_attached_punctuation_count():
    assert domain_tags("We state the theorem. Then the lemma, and finally the proof.") == ["math"]
    assert domain_tags("定理theorem与lemma") == ["math"]  # CJK next to a latin keyword splits it off
    # whole words only: "proofs" or "theorematic" are not keywords
    assert domain_tags("The proofs were theorematic and reproofed.") == []


def test_density_threshold_still_applies():
    long = "theorem lemma " + "word " * 5000
    assert domain_tags(long) == []
    assert domain_tags(long, LabelConfig(min_hits_per_1k_words=0.1)) == ["math"]
