//! Model engines: the built-in CPU MLP and the engine interface.
