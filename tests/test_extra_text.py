"""More training text from Debian packages: cleaning, the ``fortunes+NAME`` spec, the splits."""

from __future__ import annotations

import pytest

from layerfuse.data import batches
from layerfuse.data.batches import parse_spec, texts_for
from layerfuse.data.extra_text import clean_gcide, clean_rst, extra_texts
from layerfuse.errors import DataError
from layerfuse.runtime.evaluate import quality_metric

GCIDE = """00-database-short
   The Collaborative International Dictionary of English v.0.48

The original data was distributed with the notice shown below.

Affear \\Af*fear"\\, v. t. [OE. aferen, AS. [=a]f?ran. See
   {Afeard}.]
   To frighten. [Obs.] --Spenser.
   [1913 Webster]

Nectocalyx \\Nec`to*ca"lyx\\, n.; pl. {Nectocalyces}.
   (a) The swimming bell or umbrella of a jellyfish.
       [1913 Webster] Nectosac

            As might affect the earth with cold heat. --Milton.
      [WordNet 1.5 +PJC]
"""

RST = """.. _tut-if:

:keyword:`!if` Statements
=========================

Perhaps the most well-known statement type is the :keyword:`if` statement, see
:ref:`the tutorial <tut-for>` and ``match``.

   >>> x = int(input("Please enter an integer: "))

.. note::

   This is a directive's body, not prose of the page.

Short line.
"""


def test_gcide_entries_lose_markup_and_keep_their_prose():
    texts = clean_gcide(GCIDE)
    assert len(texts) == 2  # the header and licence lines are not entries
    affear, nectocalyx = texts
    assert affear.startswith("Affear, v. t. [OE. aferen, AS. af?ran. See Afeard.]")
    assert "To frighten. [Obs.] --Spenser." in affear
    assert "Webster" not in affear + nectocalyx and "Nectosac" not in nectocalyx
    assert nectocalyx.splitlines() == [
        "Nectocalyx, n.; pl. Nectocalyces. (a) The swimming bell or umbrella of a jellyfish.",
        "As might affect the earth with cold heat. --Milton.",
    ]


def test_rst_keeps_prose_paragraphs_as_plain_text():
    assert clean_rst(RST) == [
        "Perhaps the most well-known statement type is the if statement, see the tutorial "
        "and match."
    ]


def test_extra_corpora_extend_only_the_training_split(monkeypatch):
    monkeypatch.setattr(batches, "extra_texts", lambda name: (f"an extra {name} text",))
    spec = parse_spec("fortunes+gcide+pydocs")
    assert (spec.kind, spec.extras, str(spec)) == ("fortunes", ("gcide", "pydocs"), str(spec))
    assert str(spec) == "fortunes+gcide+pydocs"
    train = texts_for(spec, "train")
    assert train[-2:] == ["an extra gcide text", "an extra pydocs text"]
    assert train[:-2] == texts_for(parse_spec("fortunes"), "train")
    for split in ("calib", "valid", "test"):
        assert texts_for(spec, split) == texts_for(parse_spec("fortunes"), split)


def test_bad_extra_specs_are_refused_in_one_line():
    with pytest.raises(DataError, match=r"unknown data 'fortunes\+wiki'.*\+gcide/\+pydocs"):
        parse_spec("fortunes+wiki")
    with pytest.raises(DataError, match="random data takes no extra corpus"):
        parse_spec("random+gcide")
    with pytest.raises(DataError, match="unknown extra corpus 'wiki'"):
        extra_texts("wiki")


def test_the_dictionary_corpus_is_millions_of_characters_of_clean_prose():
    """The real package (scripts/setup.sh fetches it into the cache)."""
    texts = extra_texts("gcide")
    assert len(texts) > 100_000
    assert sum(map(len, texts)) > 20_000_000
    assert not any("[1913 Webster]" in text for text in texts[::97])
    assert any(text.startswith("Affect, v. t.") for text in texts)


def test_an_encoder_trained_with_extra_text_is_still_judged_on_fortunes_topics():
    assert quality_metric("encoder", "fortunes+gcide") == "topic_accuracy"
    assert quality_metric("causal-lm", "fortunes+pydocs") == "perplexity"
