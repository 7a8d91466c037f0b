/**
 * Structured output with correction prompts.
 *
 * `structured(schema, fn)` wraps a provider function for `call()` so that its
 * reply is parsed as JSON (code fences stripped) and validated: with a zod
 * schema (anything with `safeParse`), any Standard Schema validator
 * (`~standard`), or a JSON Schema object (a built-in subset validator). A
 * reply that does not validate throws MalformedOutput, which `call()` reports
 * as PARTIAL (the server advises CORRECT_AND_RETRY and tallies it
 * separately); the next call of `fn` on the same model gets a `correction`
 * to append to the conversation. After `maxCorrections` corrections the
 * wrapper gives up with StructuredOutputError, and `call()` does not fall
 * back: another model would need the same corrections.
 */
import { MalformedOutput, StructuredOutputError } from './errors.js';

/** What to tell the model after a malformed reply. */
export interface Correction {
  /** The reply that failed. */
  readonly reply: string;
  /** Why it failed (a JSON or validation error). */
  readonly error: string;
  /** The correction prompt: the error, plus the schema to follow when known. */
  readonly prompt: string;
  /** 1 for the first correction. */
  readonly number: number;
  /** The failed reply and the correction as chat messages (OpenAI / Anthropic shape). */
  readonly messages: ReadonlyArray<{ role: 'assistant' | 'user'; content: string }>;
}

/** The minimal zod surface used (zod 3 and 4). */
export interface ZodLike<T> {
  safeParse(value: unknown): { success: true; data: T } | { success: false; error: { issues: ReadonlyArray<{ path: ReadonlyArray<PropertyKey>; message: string }> } };
}

/** The Standard Schema v1 surface (valibot, arktype, zod 3.24+...). */
export interface StandardSchemaLike<T> {
  readonly '~standard': {
    validate(value: unknown):
      | { value: T; issues?: undefined }
      | { issues: ReadonlyArray<{ message: string; path?: ReadonlyArray<unknown> }> }
      | Promise<{ value: T; issues?: undefined } | { issues: ReadonlyArray<{ message: string; path?: ReadonlyArray<unknown> }> }>;
  };
}

/** A JSON Schema object (validated with a built-in subset: type, enum, const, required, properties, additionalProperties, items, bounds, anyOf/oneOf). */
export type JsonSchema = { readonly [key: string]: unknown };

export type Schema<T> = ZodLike<T> | StandardSchemaLike<T> | JsonSchema;

/** What a structured provider function may return: the reply text, or a provider response carrying it. */
export type ReplyLike = string | Uint8Array | { readonly [key: string]: unknown };

export interface StructuredOptions {
  /** Correction prompts before giving up (default 2). */
  maxCorrections?: number;
  /** The schema as text for correction prompts (default: JSON Schema objects as JSON, zod 4 via toJSONSchema()). */
  schemaText?: string;
}

const FENCE = /^\s*```[a-zA-Z0-9_-]*\s*\n([\s\S]*?)\n?\s*```\s*$/;

function stripFences(text: string): string {
  const m = FENCE.exec(text);
  return m ? (m[1] as string) : text.trim();
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null;

/**
 * The reply text of what `fn` returned: a string, bytes, `{text}`, `{content: string}`,
 * an Anthropic message (`content: [{type: "text", text}]`) or an OpenAI chat
 * completion (`choices[0].message.content`).
 */
export function replyText(reply: unknown): string {
  if (typeof reply === 'string') return reply;
  if (reply instanceof Uint8Array) return new TextDecoder().decode(reply);
  if (isObject(reply)) {
    if (typeof reply.text === 'string') return reply.text;
    if (typeof reply.content === 'string') return reply.content;
    if (Array.isArray(reply.content)) {
      const parts = reply.content.filter((c): c is { type: string; text: string } => isObject(c) && c.type === 'text' && typeof c.text === 'string');
      if (parts.length) return parts.map((p) => p.text).join('');
    }
    if (Array.isArray(reply.choices) && isObject(reply.choices[0])) {
      const msg = reply.choices[0].message;
      if (isObject(msg) && typeof msg.content === 'string') return msg.content;
    }
  }
  throw new TypeError(`the structured() function returned ${typeof reply}; return the model's reply text (a string)`);
}

function checkJsonSchema(value: unknown, schema: JsonSchema, path: string, errors: string[]): void {
  const options = (schema.anyOf ?? schema.oneOf) as JsonSchema[] | undefined;
  if (Array.isArray(options)) {
    const ok = options.some((opt) => {
      const sub: string[] = [];
      checkJsonSchema(value, opt, path, sub);
      return sub.length === 0;
    });
    if (!ok) errors.push(`${path}: matches none of the allowed shapes`);
    return;
  }
  const typeOf = (v: unknown): string[] => {
    if (v === null) return ['null'];
    if (Array.isArray(v)) return ['array'];
    if (typeof v === 'number') return Number.isInteger(v) ? ['integer', 'number'] : ['number'];
    if (typeof v === 'object') return ['object'];
    return [typeof v];
  };
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? (schema.type as string[]) : [schema.type as string];
    const actual = typeOf(value);
    if (!types.some((t) => actual.includes(t))) {
      errors.push(`${path}: expected ${types.join(' or ')}, got ${actual[0]}`);
      return;
    }
  }
  if (Array.isArray(schema.enum) && !schema.enum.some((e) => JSON.stringify(e) === JSON.stringify(value))) {
    errors.push(`${path}: ${JSON.stringify(value)} is not one of ${JSON.stringify(schema.enum)}`);
  }
  if ('const' in schema && JSON.stringify(schema.const) !== JSON.stringify(value)) {
    errors.push(`${path}: must be ${JSON.stringify(schema.const)}`);
  }
  if (isObject(value) && !Array.isArray(value)) {
    const props = (schema.properties ?? {}) as Record<string, JsonSchema>;
    for (const name of (schema.required ?? []) as string[]) if (!(name in value)) errors.push(`${path}.${name}: required`);
    for (const [name, v] of Object.entries(value)) {
      if (name in props) checkJsonSchema(v, props[name] as JsonSchema, `${path}.${name}`, errors);
      else if (schema.additionalProperties === false) errors.push(`${path}.${name}: not allowed`);
    }
  }
  if (Array.isArray(value)) {
    if (isObject(schema.items)) value.forEach((v, i) => checkJsonSchema(v, schema.items as JsonSchema, `${path}[${i}]`, errors));
    if (typeof schema.minItems === 'number' && value.length < schema.minItems) errors.push(`${path}: fewer than ${schema.minItems} items`);
    if (typeof schema.maxItems === 'number' && value.length > schema.maxItems) errors.push(`${path}: more than ${schema.maxItems} items`);
  }
  if (typeof value === 'string') {
    if (typeof schema.minLength === 'number' && value.length < schema.minLength) errors.push(`${path}: shorter than ${schema.minLength}`);
    if (typeof schema.maxLength === 'number' && value.length > schema.maxLength) errors.push(`${path}: longer than ${schema.maxLength}`);
  }
  if (typeof value === 'number') {
    if (typeof schema.minimum === 'number' && value < schema.minimum) errors.push(`${path}: below the minimum ${schema.minimum}`);
    if (typeof schema.maximum === 'number' && value > schema.maximum) errors.push(`${path}: above the maximum ${schema.maximum}`);
  }
}

const formatPath = (path: ReadonlyArray<unknown> | undefined): string =>
  path && path.length ? path.map((p) => (isObject(p) && 'key' in p ? String(p.key) : String(p))).join('.') + ': ' : '';

const short = (s: string, limit = 800): string => {
  const one = s.split(/\s+/).join(' ');
  return one.length <= limit ? one : `${one.slice(0, limit - 3)}...`;
};

/** Parses and validates replies against one schema. */
export class Validator<T> {
  private readonly schema: Schema<T>;
  readonly schemaText: string;

  constructor(schema: Schema<T>, schemaText?: string) {
    if (!isObject(schema)) throw new TypeError('schema must be a zod schema, a Standard Schema or a JSON Schema object');
    this.schema = schema;
    let text = schemaText ?? '';
    if (!text) {
      const toJson = (schema as { toJSONSchema?: unknown }).toJSONSchema;
      if (typeof toJson === 'function') {
        try {
          text = JSON.stringify(toJson.call(schema));
        } catch {
          text = '';
        }
      } else if (!('safeParse' in schema) && !('~standard' in schema)) text = JSON.stringify(schema);
    }
    this.schemaText = text;
  }

  async parse(reply: string): Promise<T> {
    let value: unknown;
    try {
      value = JSON.parse(stripFences(reply));
    } catch (e) {
      throw new MalformedOutput(`not valid JSON: ${(e as Error).message}`, reply);
    }
    const s = this.schema as Partial<ZodLike<T>> & Partial<StandardSchemaLike<T>>;
    if (typeof s.safeParse === 'function') {
      const r = s.safeParse(value);
      if (r.success) return r.data;
      throw new MalformedOutput(short(r.error.issues.slice(0, 5).map((i) => `${formatPath(i.path)}${i.message}`).join('; ')), reply);
    }
    if (s['~standard'] && typeof s['~standard'].validate === 'function') {
      const r = await s['~standard'].validate(value);
      if (!r.issues) return r.value;
      throw new MalformedOutput(short(r.issues.slice(0, 5).map((i) => `${formatPath(i.path)}${i.message}`).join('; ')), reply);
    }
    const errors: string[] = [];
    checkJsonSchema(value, this.schema as JsonSchema, '$', errors);
    if (errors.length) throw new MalformedOutput(errors.slice(0, 5).join('; '), reply);
    return value as T;
  }

  prompt(error: string): string {
    const schema = this.schemaText
      ? `Reply again with only a JSON value that matches this JSON schema (no prose, no code fences):\n${this.schemaText}`
      : 'Reply again with only the corrected JSON value (no prose, no code fences).';
    return `Your previous reply could not be used: ${error}\n${schema}`;
  }
}

/**
 * A provider function with reply validation and correction prompts; pass it to
 * `call()`. Each `call()` starts a fresh session (its own correction count).
 */
export class Structured<T, A = unknown> {
  readonly validator: Validator<T>;
  readonly maxCorrections: number;
  private readonly fn: (attempt: A & { correction: Correction | undefined }) => ReplyLike | Promise<ReplyLike>;

  constructor(
    schema: Schema<T>,
    fn: (attempt: A & { correction: Correction | undefined }) => ReplyLike | Promise<ReplyLike>,
    opts: StructuredOptions = {},
  ) {
    const max = opts.maxCorrections ?? 2;
    if (!Number.isInteger(max) || max < 0) throw new TypeError(`maxCorrections must be an integer >= 0, got ${max}`);
    this.validator = new Validator(schema, opts.schemaText);
    this.maxCorrections = max;
    this.fn = fn;
  }

  /** A per-call function for `call()`. */
  session(): (attempt: A) => Promise<T> {
    let pending: Correction | undefined;
    let corrections = 0;
    const errors: string[] = [];
    return async (attempt: A): Promise<T> => {
      const text = replyText(await this.fn({ ...attempt, correction: pending }));
      try {
        const value = await this.validator.parse(text);
        pending = undefined;
        return value;
      } catch (e) {
        if (!(e instanceof MalformedOutput)) throw e;
        errors.push(e.message);
        if (corrections >= this.maxCorrections) throw new StructuredOutputError(text, errors, corrections);
        corrections += 1;
        const prompt = this.validator.prompt(e.message);
        pending = {
          reply: text,
          error: e.message,
          prompt,
          number: corrections,
          messages: [
            { role: 'assistant', content: text },
            { role: 'user', content: prompt },
          ],
        };
        throw e;
      }
    };
  }
}

export function isStructured(v: unknown): v is Structured<unknown, unknown> {
  return v instanceof Structured;
}
