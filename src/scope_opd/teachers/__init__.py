"""Teacher scoring: log pi_T of each token the student sampled, teacher-forced (paper sec. 2, step 3).

* :class:`InProcessTeacher` - a `transformers` model in this process.
* :class:`ServerTeacher` - a vLLM or ``scope serve-teacher`` server over HTTP.
* :func:`check_tokenizers_match`, :func:`check_models_compatible` - can this
  teacher score this student's token ids at all?

Both scorers implement :class:`TeacherScorer`, the one method the trainer calls.
"""

from .in_process import InProcessTeacher, load_teacher_model
from .scorer import TeacherScorer
from .server_client import ServerTeacher, TeacherServerError
from .tokenizer_check import check_models_compatible, check_tokenizers_match

__all__ = [
    "InProcessTeacher",
    "ServerTeacher",
    "TeacherScorer",
    "TeacherServerError",
    "check_models_compatible",
    "check_tokenizers_match",
    "load_teacher_model",
]
