"""Evaluation: perplexity (the project's one definition) and the named corpora."""

from jquant.eval.corpus import CORPORA as CORPORA
from jquant.eval.corpus import load_corpus as load_corpus
from jquant.eval.perplexity import PerplexityResult as PerplexityResult
from jquant.eval.perplexity import cut_windows as cut_windows
from jquant.eval.perplexity import perplexity as perplexity
