"""Evaluation: perplexity (the project's one definition), the named corpora, and what the
``jquant eval`` / ``compare`` commands measure (`evaluate`, `compare`)."""

from jquant.eval.compare import check_plot_path as check_plot_path
from jquant.eval.compare import compare as compare
from jquant.eval.compare import compare_recipes as compare_recipes
from jquant.eval.compare import format_table as format_table
from jquant.eval.compare import plot as plot
from jquant.eval.corpus import CORPORA as CORPORA
from jquant.eval.corpus import load_corpus as load_corpus
from jquant.eval.measure import decode_speed as decode_speed
from jquant.eval.measure import evaluate as evaluate
from jquant.eval.measure import weight_stats as weight_stats
from jquant.eval.perplexity import PerplexityResult as PerplexityResult
from jquant.eval.perplexity import cut_windows as cut_windows
from jquant.eval.perplexity import perplexity as perplexity
