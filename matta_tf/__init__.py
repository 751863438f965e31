"""matta-tf: MatTA (Matryoshka Teaching Assistant) for TensorFlow and Keras 3.

One production (Student) ranking model is M-nested into a larger Teaching Assistant (TA), both are
co-trained with distillation, and Mix'n'Match extracts many servable Student models from one run.
"""

__version__ = "0.1.0"
