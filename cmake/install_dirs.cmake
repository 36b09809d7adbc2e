# Where the HeadAttention package goes, relative to the install prefix. Shared by cmake/install.cmake and the
# package tests in tests/package, which are configured before the install rules. Safe to include again.
include(GNUInstallDirs)

set(HEAD_ATTENTION_INSTALL_CMAKEDIR
    "${CMAKE_INSTALL_DATADIR}/cmake/HeadAttention"
    CACHE STRING "Where to install HeadAttentionConfig.cmake and friends, relative to the prefix")
set(HEAD_ATTENTION_INSTALL_PKGCONFIGDIR
    "${CMAKE_INSTALL_DATADIR}/pkgconfig"
    CACHE STRING "Where to install head_attention.pc, relative to the prefix")
mark_as_advanced(HEAD_ATTENTION_INSTALL_CMAKEDIR HEAD_ATTENTION_INSTALL_PKGCONFIGDIR)
