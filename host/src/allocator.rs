//! The process's memory allocator: jemalloc serves every allocation of the host's Rust
//! code. Requests, bodies and batches are allocated on the runtime's threads and freed
//! on the database writer's (and back); glibc's allocator takes the owning arena's lock
//! for such a free, and its allocation and free paths were a fifth of the runtime
//! threads' samples with single-message publishes. SQLite keeps glibc's allocator.

use std::ffi::{c_char, c_int};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`): threads cache freed blocks of
/// up to 4 KiB, not the default 32 KiB, since what they hold is never handed back to the
/// OS and an idle host would keep about 2 MB more for good. Throughput is the same.
/// (`tikv-jemalloc-sys` builds jemalloc with its symbols prefixed `_rjem_`.)
#[unsafe(export_name = "_rjem_malloc_conf")]
static OPTIONS: Options = Options(c"tcache_max:4096".as_ptr());

/// A C string for jemalloc to read, shared by every thread.
#[repr(transparent)]
struct Options(*const c_char);

// SAFETY: the pointer is to a `'static` string that nothing writes.
unsafe impl Sync for Options {}

/// Hands the memory freed so far back to the OS (most of it, at start, the compiler's,
/// which compiled the handler components): both allocators keep freed memory for reuse
/// otherwise, and an idle host would hold it for good.
pub fn release_freed_memory() {
    let status = purge_every_arena();
    if status != 0 {
        tracing::debug!(status, "jemalloc did not purge its arenas");
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only returns free memory of glibc's arenas (SQLite's) to the
    // OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Returns the unused pages of all of jemalloc's arenas to the OS; jemalloc's status
/// (0 when done).
fn purge_every_arena() -> c_int {
    // 4096 is `MALLCTL_ARENAS_ALL`, jemalloc's index for every arena at once.
    // SAFETY: the command takes no value, so no old or new value is read or written.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_runs_with_the_options_set_here() {
        let mut tcache_max: usize = 0;
        let mut size = std::mem::size_of::<usize>();
        // SAFETY: `opt.tcache_max` is a `size_t`, read into one of that size.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.tcache_max".as_ptr(),
                (&raw mut tcache_max).cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(status, 0);
        assert_eq!(tcache_max, 4096);
    }

    #[test]
    fn the_arenas_are_purged() {
        let freed: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(freed);
        assert_eq!(purge_every_arena(), 0);
    }
}
