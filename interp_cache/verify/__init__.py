from interp_cache.verify.checks import *  # noqa  (interim)
from interp_cache.verify.checks import original_logits, verify, verify_decode_loop  # noqa
