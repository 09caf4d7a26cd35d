//! Process measurements: CPU time (getrusage), resident memory (/proc) and
//! the file-descriptor limit (setrlimit).

/// User + system CPU seconds this process has used so far (all threads).
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn status_kib(field: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Current resident set size, KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// Peak resident set size so far, KiB (`VmHWM`).
pub fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (old, new).
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    // SAFETY: plain syscalls on a struct we own.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur as u64;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur as u64))
}

/// Returns allocator free pages to the OS where the allocator supports it,
/// so RSS readings reflect live memory (glibc only; a no-op elsewhere).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
