"""KDABert with the MSE kept: the adversarial term is added to TinyBERT's hidden-state MSE.

Student loss `0.5 T^2 KL (T = 2) + 0.5 CE + gamma * sum_l MSE(h_s W_h, h_t) +
lambda_adv * sum_l L_G(D_l(h_s W_h))` with gamma = 1 (TinyBERT's weight) and lambda_adv = 0.1;
everything else as configs/kdabert.py (same argument `SETTING[,LOSS]`, default tenth_size,bce).

  kdjax distill --config configs/kdabert_mse.py --workdir runs/kdabert_mse
  kdjax distill --config configs/kdabert_mse.py:few_labels,hinge --workdir runs/kdabert_mse_fl
"""

from kdjax import recipes


def get_config(arg=None):
    return recipes.kdabert_config(arg, hidden_mse=1.0)
