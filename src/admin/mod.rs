//! Operating a running baton: the control socket the CLI talks to.
