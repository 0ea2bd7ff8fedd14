"""Text corpora shipped with the package, so the main job runs with no download.

tinyshakespeare.txt is the 1.1 MB character-level corpus from Karpathy's char-rnn (public-domain
Shakespeare text).
"""

from pathlib import Path

TINYSHAKESPEARE = Path(__file__).with_name("tinyshakespeare.txt")
