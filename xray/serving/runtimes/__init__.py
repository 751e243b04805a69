"""The model's runtimes beyond compiled Keras: int8 made with NNCF under an accuracy control (``int8``)."""
