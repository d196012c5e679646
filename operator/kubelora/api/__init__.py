"""The kubelora.dev/v1alpha1 API types."""

from kubelora.api.v1alpha1 import *  # noqa: F403
from kubelora.api.v1alpha1 import API_VERSION, GROUP, VERSION, dump  # noqa: F401
