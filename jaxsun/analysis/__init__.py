"""Analysis: attention statistics, training stability, sharpness, figures.

The measures of the Affine-Scaled Attention paper's analysis (papers.md §2):

Attention statistics (`attention_stats`), on effective weights w: f32[L, B, H, T, S]
(0 on keys a query cannot see) and an optional query mask valid: bool[B, T]; every
average runs over the valid queries only:

    attention_entropy(w, valid)   f32[L, H]  entropy (nats) of p = |w| / sum |w| per query
    first_token_mass(w, valid)    f32[L, H]  raw weight on key 0, queries t >= 1
    query_mass(w, valid)          QueryMass  per-query sum_s w (values f32[L, H, N],
                                             mean/std f32[L], quantiles f32[L, Q])
    head_diversity(w, valid)      f32[L]     mean pairwise JSD of the heads' p rows
                                             (metric="cosine": 1 - mean cosine of w rows)
    summarize(w, valid)           dict       all of the above, JSON-friendly
    attention_summary(model, tokens, valid)  summarize(model.attention_weights(tokens))

|w| is normalised because Affine-Scaled Attention's weights alpha softmax + beta can be
negative and need not sum to 1; for softmax rows p == w and the measures are the usual
ones.

Training stability (`stability`), on per-step series:

    grad_norm_variance(grad_norms, window=None, start=0, stop=None)   np.var over [start, stop)
    rolling_variance(x, window)                                      f64[n - window + 1]
    loss_spikes(losses, k, window=50)   Spikes: steps with loss > median + k * MAD of the
                                        `window` previous steps (None: the whole series)
    mad(x, scale=1.0)                   raw median absolute deviation
    stability_summary(losses, grad_norms, ks=(6, 9))                 dict
    divergence(losses, margin=1.0, patience=1)   Divergence: first non-finite loss, or
                                        first of `patience` steps above the running
                                        minimum + margin (precision study, papers.md §8)
    grad_norm_stats(grad_norms)         mean / std / max / p99 / non-finite count

Sharpness (`sharpness`), on logits: phi = 100 [max over the box |y| <= eps (|x| + 1)
of f(x + y) - f(x)] / (1 + f(x)), maximised by projected sign-gradient ascent:

    logit_sharpness(loss_fn, x, data=None, eps=1e-3, steps=10, step_size=0.25)
    last_token_sharpness(logits, targets, ...)   phi of the last token's mean CE

Figures (`plots`; matplotlib is imported on the first plot): each takes
{variant_name: data} and writes one PNG, variants in consistent colours.
"""

from jaxsun.analysis.attention_stats import (QUANTILES, QueryMass, attention_entropy,
                                             attention_summary, first_token_mass,
                                             head_diversity, query_mass, summarize)
from jaxsun.analysis.plots import (plot_attention_maps, plot_entropy_per_layer,
                                   plot_first_token_mass_per_layer,
                                   plot_head_diversity_per_layer,
                                   plot_query_mass_distribution, plot_training_curves,
                                   variant_colors)
from jaxsun.analysis.sharpness import last_token_sharpness, logit_sharpness
from jaxsun.analysis.stability import (Divergence, Spikes, divergence, grad_norm_stats,
                                       grad_norm_variance, loss_spikes, mad,
                                       rolling_variance, stability_summary)

__all__ = [
    "QUANTILES", "QueryMass", "attention_entropy", "attention_summary", "first_token_mass",
    "head_diversity", "query_mass", "summarize",
    "Spikes", "grad_norm_variance", "loss_spikes", "mad", "rolling_variance",
    "stability_summary", "Divergence", "divergence", "grad_norm_stats",
    "last_token_sharpness", "logit_sharpness",
    "plot_attention_maps", "plot_entropy_per_layer", "plot_first_token_mass_per_layer",
    "plot_head_diversity_per_layer", "plot_query_mass_distribution", "plot_training_curves",
    "variant_colors",
]
