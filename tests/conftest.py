# Its presence puts tests/ on sys.path (pytest's prepend import mode), so unit and integration
# tests share the helpers kept here (tiny_vaes.py).
